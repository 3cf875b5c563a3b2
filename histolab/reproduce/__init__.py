"""``python -m histolab reproduce PAPER``: each paper's protocol as one command (histolab.reproduce.plan for
what runs, histolab.reproduce.run for how, histolab.reproduce.table for what comes out)."""
