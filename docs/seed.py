"""The seed example, o = (x + y) * sin(x), for `gradserve graph show docs/seed.py`."""

from gradserve.client import GraphBuilder

graph = GraphBuilder()
x, y = graph.input("x", "float32", [1]), graph.input("y", "float32", [1])
graph.output("o", (x + y) * graph.sin(x))
