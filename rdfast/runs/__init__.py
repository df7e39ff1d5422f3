"""Runs and their files: the engine that walks seeds and strategies (`engine`), the
dense models (`dense`), one pruning run (`pruning_run`) and a given model's study
(`given_study`), both through one lifecycle (`lifecycle`), their keys (`keys`), and OUT's files
(`store`, `manifests`).
"""
