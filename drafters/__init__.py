"""leapserve.drafters: proposal sources for the speculative decoder (`leapserve.decoding.drafter.Drafter`).

`ngram` (prompt lookup, no weights) and `draft_model` (a small causal LM sharing the target's tokenizer).
"""
