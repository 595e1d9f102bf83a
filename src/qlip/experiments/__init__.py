"""Laptop-scale reproductions of the paper's findings (issue 7; spec section 8): the balance sweep (Table 3a),
balancing modes, and the training recipes (Table 3c), each run as variants x seeds, evaluated with the evaluation
harness and written as JSON / Markdown tables and plots. Entry points: ``qlip experiment ...`` (see ``cli.py``)."""
