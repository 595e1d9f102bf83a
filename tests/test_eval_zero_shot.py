"""Zero-shot classifier and accuracy: batched template averaging, order invariances, controlled toy embeddings."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qlip.data import ClassificationTask
from qlip.eval.zero_shot import (
    TemplateError,
    accuracy_summary,
    build_zero_shot_classifier,
    evaluate_zero_shot_tasks,
    load_classnames,
    load_templates,
    zero_shot_accuracy,
    zero_shot_probabilities,
)

torch.set_num_threads(1)


class ToyTextModel(nn.Module):
    """encode_text looks each whole prompt up in a random table: every prompt has its own known embedding."""

    def __init__(self, prompts: list[str], dim: int = 6, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.ids = {p: i for i, p in enumerate(prompts)}
        self.table = nn.Parameter(torch.randn(len(prompts), dim, generator=g))
        self.calls: list[int] = []

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[self.ids[t]] for t in texts])

    def encode_text(self, ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        self.calls.append(ids.shape[0])
        emb = self.table[ids[:, 0]]
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        emb = images.flatten(1)  # the test writes the embedding straight into the "pixels"
        return F.normalize(emb, dim=-1) if normalize else emb


CLASSES = ["cat", "dog", "car", "tree", "ship"]
TEMPLATES = ["a {}.", "a photo of a {}.", "art of the {}."]


@pytest.fixture()
def toy() -> ToyTextModel:
    return ToyTextModel([t.format(c) for c in CLASSES for t in TEMPLATES])


def reference_classifier(model: ToyTextModel, classes: list[str], templates: list[str]) -> torch.Tensor:
    """The protocol written plainly: per class, normalize each template embedding, average, re-normalize."""
    cols = []
    for c in classes:
        emb = F.normalize(model.table[[model.ids[t.format(c)] for t in templates]].detach(), dim=-1)
        cols.append(F.normalize(emb.mean(dim=0), dim=0))
    return torch.stack(cols, dim=1)


def test_classifier_matches_the_protocol_and_is_batched(toy):
    clf = build_zero_shot_classifier(toy, toy.tokenize, CLASSES, TEMPLATES, batch_size=4)
    assert clf.shape == (6, len(CLASSES))
    torch.testing.assert_close(clf, reference_classifier(toy, CLASSES, TEMPLATES), atol=1e-6, rtol=0)
    torch.testing.assert_close(clf.norm(dim=0), torch.ones(len(CLASSES)), atol=1e-6, rtol=0)
    # 15 prompts in batches of 4 that cross class boundaries: 4 + 4 + 4 + 3 calls
    assert toy.calls == [4, 4, 4, 3]
    one_call = build_zero_shot_classifier(toy, toy.tokenize, CLASSES, TEMPLATES, batch_size=100)
    torch.testing.assert_close(one_call, clf, atol=1e-6, rtol=0)


def test_permuting_classes_permutes_columns_and_templates_change_nothing(toy):
    clf = build_zero_shot_classifier(toy, toy.tokenize, CLASSES, TEMPLATES, batch_size=5)
    perm = [3, 0, 4, 1, 2]
    permuted = build_zero_shot_classifier(toy, toy.tokenize, [CLASSES[i] for i in perm], TEMPLATES, batch_size=5)
    torch.testing.assert_close(permuted, clf[:, perm], atol=1e-6, rtol=0)
    reordered = build_zero_shot_classifier(toy, toy.tokenize, CLASSES, TEMPLATES[::-1], batch_size=2)
    torch.testing.assert_close(reordered, clf, atol=1e-6, rtol=0)
    # a single template gives a different classifier: the averaging really happens
    single = build_zero_shot_classifier(toy, toy.tokenize, CLASSES, TEMPLATES[:1])
    assert not torch.allclose(single, clf, atol=1e-3)


def _batches(emb: torch.Tensor, labels: torch.Tensor, size: int):
    for s in range(0, emb.shape[0], size):
        yield {"image": emb[s : s + size, :, None, None], "label": labels[s : s + size]}


def test_accuracy_on_controlled_embeddings():
    model = ToyTextModel(["x"], dim=6)
    classifier = torch.eye(6)  # class c = basis direction c
    # 6 images: image i points mostly at class order[i], with class j second
    order = torch.tensor([0, 1, 2, 3, 4, 5])
    labels = torch.tensor([0, 1, 5, 3, 2, 2])  # correct: 0, 1, 3 -> top-1 = 3/6
    emb = torch.eye(6)[order] * 2 + torch.eye(6)[labels.roll(1)] * 0.1
    out = zero_shot_accuracy(model, classifier, _batches(emb, labels, 4), topk=(1, 5))
    assert out["n"] == 6 and out["num_classes"] == 6
    assert out["top1"] == pytest.approx(3 / 6)
    pred = emb.argmax(dim=1)
    expected = torch.zeros(6, 6, dtype=torch.int64)
    for t, p in zip(labels, pred):
        expected[t, p] += 1
    assert out["confusion"] == expected.tolist()
    top5 = (emb.topk(5, dim=1).indices == labels[:, None]).any(dim=1).float().mean()
    assert out["top5"] == pytest.approx(float(top5))


def test_top5_only_with_five_classes_and_label_checks():
    logits = torch.tensor([[0.9, 0.1, 0.0, 0.2], [0.1, 0.2, 0.8, 0.0]])
    out = accuracy_summary(logits, torch.tensor([0, 1]), topk=(1, 5))
    assert out["top1"] == 0.5 and "top5" not in out
    with pytest.raises(ValueError, match="labels must lie"):
        accuracy_summary(logits, torch.tensor([0, 4]))
    many = accuracy_summary(torch.randn(3, 40), torch.tensor([0, 1, 2]))
    assert "confusion" not in many  # too many classes for a readable matrix


def test_label_key_reads_task_labels():
    model = ToyTextModel(["x"], dim=3)
    emb = torch.eye(3)
    batch = {"image": emb[:, :, None, None], "label": torch.tensor([2, 2, 2]), "labels": {"color": torch.arange(3)}}
    assert zero_shot_accuracy(model, torch.eye(3), [batch], label_key="color")["top1"] == 1.0
    with pytest.raises(KeyError, match="no labels for task"):
        zero_shot_accuracy(model, torch.eye(3), [batch], label_key="shape")


def test_shipped_lists():
    names = load_classnames("imagenet")
    assert len(names) == 1000 and names[0] == "tench" and names[-1] == "toilet paper"
    templates = load_templates("openai")
    assert len(templates) == 80 and len(set(templates)) == 80
    assert all(t.count("{}") == 1 for t in templates)
    assert "a photo of a {}." in templates


def test_bad_lists_are_rejected(tmp_path):
    bad = tmp_path / "t.txt"
    bad.write_text("a photo of a cat\n")
    with pytest.raises(ValueError, match="exactly one"):
        load_templates(str(bad))
    with pytest.raises(ValueError, match="not a shipped list"):
        load_classnames("imagenet-22k")
    (tmp_path / "c.txt").write_text("cat\n\ndog\n")
    assert load_classnames(str(tmp_path / "c.txt")) == ["cat", "dog"]


def test_classify_probabilities_do_not_depend_on_batch_sizes(toy):
    """What `qlip classify` prints: the same probabilities whatever the text and image batch sizes."""
    toy.logit_scale = nn.Parameter(torch.tensor(2.0))
    images = torch.randn(10, 6, 1, 1, generator=torch.Generator().manual_seed(1))  # 10 image embeddings
    results = []
    for text_batch, image_batch in ((1, 1), (7, 7), (64, 3)):
        clf = build_zero_shot_classifier(toy, toy.tokenize, CLASSES, TEMPLATES, batch_size=text_batch)
        results.append(zero_shot_probabilities(toy, clf, images, batch_size=image_batch))
    cosine = F.normalize(images.flatten(1), dim=-1) @ reference_classifier(toy, CLASSES, TEMPLATES)
    expected = (math.exp(2.0) * cosine).softmax(dim=-1)  # the learned scale is stored as its log
    for probs in results:
        assert probs.shape == (10, len(CLASSES))
        torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(probs.sum(dim=-1), torch.ones(10))


@pytest.mark.parametrize("template", ["a photo of a {x}.", "a {} {", "a {", "a } of {}", "{} and {}", "no slot"])
def test_bad_templates_raise_one_clear_error(toy, template):
    """A template str.format cannot fill with one class name: one ValueError subclass, one line, naming it."""
    with pytest.raises(TemplateError) as err:
        load_templates([template])
    message = str(err.value)
    assert repr(template) in message and "exactly one {}" in message and "\n" not in message
    # The same error where templates come from a task (shapes tasks, or a --templates option), not a list.
    task = ClassificationTask(("cat", "dog"), ("a {}.", template), None)
    with pytest.raises(TemplateError, match="exactly one"):
        build_zero_shot_classifier(toy, toy.tokenize, list(task.classnames), list(task.templates))
    batch = {"image": torch.randn(2, 6, 1, 1), "label": torch.tensor([0, 1])}
    with pytest.raises(TemplateError, match="exactly one"):
        evaluate_zero_shot_tasks(toy, toy.tokenize, [batch], {"animal": task})
    assert issubclass(TemplateError, ValueError)  # what the command line turns into a one-line error


def test_a_literal_brace_is_fine(toy):
    assert load_templates(["a {} {{sic}}"]) == ["a {} {{sic}}"]
