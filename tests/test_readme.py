"""The README documents every option: its reference section is generated from the config's help texts."""

from pathlib import Path

from config_reference import reference_markdown

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN = "<!-- BEGIN CONFIG REFERENCE"
END = "<!-- END CONFIG REFERENCE -->"


def current_reference() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("\n", text.index(BEGIN)) + 1
    return text[start : text.index(END)]


def test_readme_reference_matches_the_config():
    assert current_reference() == reference_markdown(), "run: .venv/bin/python tests/test_readme.py --write"


def test_readme_quick_start_commands():
    text = README.read_text(encoding="utf-8")
    assert "make demo" in text and "make test" in text


if __name__ == "__main__":
    import sys

    if "--write" in sys.argv:
        text = README.read_text(encoding="utf-8")
        start = text.index("\n", text.index(BEGIN)) + 1
        README.write_text(text[:start] + reference_markdown() + text[text.index(END):], encoding="utf-8")
        print("README reference updated")
