"""The dependency graph as a picture: which layers share which channel groups, and what is frozen.

`groups_graph(deps)` is a networkx graph with a node per module that holds a group's tensors
(`kind="module"`), per channel group (`kind="group"`: its kind of units and their count) and per
frozen site (`kind="frozen"`: how many channels, why); a module is joined to each group whose
channels it produces (`role="out"`) or reads (`role="in"`).  `write_groups_graph` writes it as
GraphML, Graphviz DOT or a self-contained HTML page (by the file's suffix).
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import networkx as nx

from graphprune.analysis.dependency import Dependencies
from graphprune.errors import ArgumentError

__all__ = ["groups_graph", "write_groups_graph", "GRAPH_FORMATS"]

GRAPH_FORMATS = (".graphml", ".dot", ".html")


def groups_graph(deps: Dependencies) -> nx.Graph:
    graph = nx.Graph()
    for g in deps.groups:
        graph.add_node(f"group:{g.key}", kind="group", label=g.key, units=g.size, unit_kind=g.kind)
        for slot in g.slots:
            module = slot.tensor.rpartition(".")[0] or "(root)"
            graph.add_node(f"module:{module}", kind="module", label=module)
            role = "in" if slot in g.consumers else "out"
            edge = graph.get_edge_data(f"module:{module}", f"group:{g.key}")
            if edge is None or edge["role"] == "in":  # a module that produces a group's channels shows as "out"
                graph.add_edge(f"module:{module}", f"group:{g.key}", role=role)
    for i, f in enumerate(deps.frozen):
        where = f.site.location or f.site.node
        graph.add_node(f"frozen:{i}", kind="frozen", label=where, channels=f.channels, reason=f.site.reason)
    return graph


def write_groups_graph(deps: Dependencies, path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix not in GRAPH_FORMATS:
        raise ArgumentError(f"the dependency graph is written as {GRAPH_FORMATS}, not {path.suffix or 'no suffix'}")
    graph = groups_graph(deps)
    if path.suffix == ".graphml":
        nx.write_graphml(graph, path)
    elif path.suffix == ".dot":
        path.write_text(_dot(graph))
    else:
        path.write_text(_html(deps))
    return path


def _dot(graph: nx.Graph) -> str:
    shapes = {"module": "box", "group": "ellipse", "frozen": "octagon"}
    colors = {"module": "white", "group": "lightblue", "frozen": "salmon"}

    def quote(text: object) -> str:
        return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = ["graph groups {", "  node [style=filled];"]
    for node, data in graph.nodes(data=True):
        label = data["label"] + (f"\\n{data['units']} {data['unit_kind']} units" if data["kind"] == "group" else "")
        if data["kind"] == "frozen":
            label += f"\\n{data['channels']} frozen: {data['reason']}"
        lines.append(
            f"  {quote(node)} [label={quote(label)}, shape={shapes[data['kind']]}, fillcolor={colors[data['kind']]}];"
        )
    for a, b, data in graph.edges(data=True):
        lines.append(f"  {quote(a)} -- {quote(b)} [style={'dashed' if data['role'] == 'in' else 'solid'}];")
    return "\n".join(lines + ["}"]) + "\n"


def _html(deps: Dependencies) -> str:
    e = html.escape
    rows = []
    for g in deps.groups:
        produce = sorted({s.tensor.rpartition(".")[0] for s in g.slots if s not in g.consumers})
        read = sorted({s.tensor.rpartition(".")[0] for s in g.slots if s in g.consumers} - set(produce))
        rows.append(
            f"<tr><td>{e(g.key)}</td><td>{e(g.kind)}</td><td>{g.size}</td>"
            f"<td>{e(', '.join(produce))}</td><td>{e(', '.join(read))}</td></tr>"
        )
    frozen = [
        f"<tr><td>{e(f.site.location or f.site.node)}</td><td>{f.channels}</td><td>{e(f.site.reason)}</td></tr>"
        for f in deps.frozen
    ]
    return (
        "<!doctype html><meta charset='utf-8'><title>graphprune channel groups</title>"
        "<style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:2px 6px}"
        "table{border-collapse:collapse;margin-bottom:2em}.frozen td{background:#fde}</style>"
        f"<h1>Channel groups ({len(deps.groups)})</h1><p>Channels in one group are removed together: the "
        "modules that produce them and the ones that read them.</p>"
        "<table><tr><th>group</th><th>kind</th><th>units</th><th>produced by</th><th>read by</th></tr>"
        + "".join(rows)
        + f"</table><h1>Frozen channels ({sum(f.channels for f in deps.frozen)})</h1>"
        "<table class='frozen'><tr><th>where</th><th>channels</th><th>why</th></tr>" + "".join(frozen) + "</table>\n"
    )
