"""Pruning: the strategies' scores and global selection (`strategies`), a given model
and its checkpoint (`given_model`, `checkpoints`), and streamed pruning of large
checkpoints (`streaming`).
"""
