"""Command-line interface (`rdfast ...`): parse, validate, call the library, print."""

if __name__ != "rdfast.cli":  # imported as top-level `cli` from a clone's root
    from rdfast._toplevel import hand_over

    hand_over(__name__, __file__)
