"""How the package's command-line tools lay out --help."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The description as written (a CLI module's whole docstring, its paragraphs and lists kept),
    and each option's default where it has one: not for None or "" (an option left out does
    nothing) nor for a flag's False."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == "":
            return action.help
        return super()._get_help_string(action)
