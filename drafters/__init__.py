"""leapserve.drafters: proposal sources for the speculative decoder (`leapserve.decoding.drafter.Drafter`).

`ngram` (prompt lookup, no weights), `draft_model` (a small causal LM sharing the target's tokenizer) and `fspad`
(a trained FSPAD feature drafter reading the target's features). The two model drafters grow their trees with
`tree_growth.TreeGrower` and load their checkpoints with `checkpoints`.
"""
