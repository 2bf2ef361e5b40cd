"""Pattern matchers: recognise subgraphs of the exported aten graph and describe them.

Each `match_<family>(node)` tries one anchor node and returns a match object (the nodes involved and
the extracted parameters) or None; `helpers.find_matches` walks a graph. Matchers never rewrite:
transforms decide what to do with a match.
"""
