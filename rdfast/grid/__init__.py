"""`rdfast grid`: a TOML spec checked and expanded into jobs (`spec`), the driver that
skips what OUT holds and records results (`driver`), what a worker runs (`tasks`) and
where (`executors`).
"""
