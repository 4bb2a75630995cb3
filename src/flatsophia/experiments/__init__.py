"""Research tooling on top of the template: claim studies, fair tuning, run summaries, the 2-D toy.

Nothing here is needed to train; ``scripts/`` holds thin command-line wrappers around these modules.
"""
