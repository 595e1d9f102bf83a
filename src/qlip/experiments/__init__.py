"""Laptop-scale reproductions of the paper's findings (docs/results.md): the balance sweep (Table 3a),
balancing modes, and the training recipes (Table 3c), each run as variants x seeds, evaluated with the evaluation
harness and written as JSON / Markdown tables and plots. Entry points: ``qlip experiment ...``
(``qlip/cli/experiment.py``)."""
