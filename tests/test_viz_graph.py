"""minseg.viz.graph: the autograd graph as DOT text (parsed back here); render_graph with and without Graphviz."""
import re
import shutil

import numpy as np
import pytest

import minseg
import minseg.functional as F
from minseg import viz

NODE = re.compile(r'^\s*(\w+) \[(.*)\];$')
EDGE = re.compile(r"^\s*(\w+) -> (\w+);$")
ATTRIBUTE = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^,\s]+)')


def parse_dot(text: str):
    """({node id: {attribute: value}}, [(tail, head), ...]) of the DOT that viz.graph writes."""
    lines = text.strip().splitlines()
    assert lines[0] == "digraph autograd {" and lines[-1] == "}"
    nodes, edges = {}, []
    for line in lines[2:-1]:
        if m := EDGE.match(line):
            edges.append(m.groups())
        elif m := NODE.match(line):
            attrs = {}
            for key, value in ATTRIBUTE.findall(m.group(2)):
                if value.startswith('"'):  # undo the DOT string escapes
                    value = re.sub(r"\\(.)", lambda e: "\n" if e.group(1) == "n" else e.group(1), value[1:-1])
                attrs[key] = value
            assert m.group(1) not in nodes, f"node {m.group(1)} declared twice"
            nodes[m.group(1)] = attrs
        else:
            raise AssertionError(f"unexpected DOT line {line!r}")
    for tail, head in edges:
        assert tail in nodes and head in nodes, f"edge {tail} -> {head} names an undeclared node"
    return nodes, edges


def labelled_edges(nodes, edges):
    return sorted((nodes[a]["label"], nodes[b]["label"]) for a, b in edges)


def test_small_graph_has_exactly_its_nodes_and_edges():
    a = minseg.tensor(np.ones((2, 3)), requires_grad=True)
    b = minseg.tensor(np.ones(3))  # float64, no gradient wanted
    c = a * b
    loss = c.sum()
    nodes, edges = parse_dot(viz.graph(loss, names={"a": a, "b": b}))
    labels = {n: attrs["label"] for n, attrs in nodes.items()}
    assert sorted(labels.values()) == sorted(
        [
            "() float64\nrequires_grad",  # loss
            "Sum",
            "(2, 3) float64\nrequires_grad",  # c
            "Mul",
            "a\n(2, 3) float64\nleaf, requires_grad",
            "b\n(3,) float64\nleaf",
        ]
    )
    assert labelled_edges(nodes, edges) == sorted(
        [
            ("Sum", "() float64\nrequires_grad"),
            ("(2, 3) float64\nrequires_grad", "Sum"),
            ("Mul", "(2, 3) float64\nrequires_grad"),
            ("a\n(2, 3) float64\nleaf, requires_grad", "Mul"),
            ("b\n(3,) float64\nleaf", "Mul"),
        ]
    )
    by_label = {attrs["label"]: attrs for attrs in nodes.values()}
    # Functions are boxes; tensors ellipses coloured by role
    assert by_label["Sum"]["shape"] == by_label["Mul"]["shape"] == "box"
    assert by_label["() float64\nrequires_grad"]["fillcolor"] == "palegreen"  # the root
    assert by_label["a\n(2, 3) float64\nleaf, requires_grad"]["fillcolor"] == "lightblue"
    assert by_label["b\n(3,) float64\nleaf"]["fillcolor"] == "lightgrey"
    assert by_label["(2, 3) float64\nrequires_grad"]["fillcolor"] == "white"
    # numbered breadth-first from the root: the same graph gives the same text
    assert nodes["t0"]["label"] == "() float64\nrequires_grad" and nodes["f0"]["label"] == "Sum"
    assert viz.graph(loss, names={"a": a, "b": b}) == viz.graph(loss, names={"a": a, "b": b})


def test_tensor_used_twice_has_two_edges_and_non_tensor_arguments_are_not_drawn():
    x = minseg.tensor(np.ones((1, 1, 3, 3), np.float32), requires_grad=True)
    w = minseg.tensor(np.ones((2, 1, 2, 2), np.float32), requires_grad=True)
    y = F.conv2d(x, w, None, stride=1)  # bias=None and the stride are not Tensors
    z = y * y
    nodes, edges = parse_dot(viz.graph(z, names={"x": x, "w": w}))
    assert sorted(a["label"] for a in nodes.values() if a["shape"] == "box") == ["Conv2dFunction", "Mul"]
    y_label = "(1, 2, 2, 2) float32\nrequires_grad"
    assert labelled_edges(nodes, edges) == sorted(
        [
            ("Mul", "(1, 2, 2, 2) float32\nrequires_grad"),  # z
            (y_label, "Mul"),
            (y_label, "Mul"),  # y * y: y is both operands
            ("Conv2dFunction", y_label),
            ("x\n(1, 1, 3, 3) float32\nleaf, requires_grad", "Conv2dFunction"),
            ("w\n(2, 1, 2, 2) float32\nleaf, requires_grad", "Conv2dFunction"),
        ]
    )
    assert len(nodes) == 6  # z, y, x, w and the two Functions: nothing for bias=None


def test_a_tensor_without_graph_is_one_leaf_node():
    x = minseg.tensor(np.zeros((2,), np.float32), requires_grad=True)
    with minseg.no_grad():
        y = x * 2
    nodes, edges = parse_dot(viz.graph(y))
    assert edges == [] and [a["label"] for a in nodes.values()] == ["(2,) float32\nleaf"]


def test_names_with_quotes_and_backslashes_survive_escaping():
    x = minseg.tensor(np.zeros((1,)), requires_grad=True)
    name = 'odd "name" \\ here'
    nodes, _ = parse_dot(viz.graph(x, names={name: x}))
    assert nodes["t0"]["label"] == name + "\n(1,) float64\nleaf, requires_grad"


def test_render_graph_without_graphviz_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setattr(viz.shutil, "which", lambda program: None)
    dot = viz.graph(minseg.tensor(np.zeros(1), requires_grad=True))
    with pytest.raises(RuntimeError, match="Graphviz's 'dot' program"):
        viz.render_graph(dot, tmp_path / "g.png")
    assert viz.render_graph(dot, tmp_path / "g.png", missing_ok=True) is False
    assert not (tmp_path / "g.png").exists()


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed (the DOT text is tested above)")
def test_render_graph_with_graphviz_writes_a_png(tmp_path):
    a = minseg.tensor(np.ones((2, 2)), requires_grad=True)
    assert viz.render_graph(viz.graph((a * a).sum()), tmp_path / "g.png") is True
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(RuntimeError, match="dot failed"):
        viz.render_graph("digraph { this is not dot", tmp_path / "bad.png")
