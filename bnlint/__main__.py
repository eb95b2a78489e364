from bnlint.cli import entry

entry()
