"""``python -m tools.bench``: the benchmark (:mod:`.suite`); ``... report`` regenerates its markdown and plot
(:mod:`.report`); ``... sweep`` runs a tuning sweep (:mod:`.sweep`)."""

from __future__ import annotations

import sys

COMMANDS = ("report", "sweep")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        from .report import main as report_main

        return report_main(argv[1:])
    if argv[:1] == ["sweep"]:
        from .sweep import main as sweep_main

        return sweep_main(argv[1:])
    from .suite import main as suite_main

    return suite_main(argv)


if __name__ == "__main__":
    sys.exit(main())
