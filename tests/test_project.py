"""The project keeps its promises to a newcomer: CI runs exactly the README's test command."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    return [lines[i + 1] for i, line in enumerate(lines) if line == "```bash" and lines[i + 1].startswith("python3 -m venv")]


def test_ci_runs_the_readme_test_command() -> None:
    main_job, test_command = readme_commands()
    assert "retrofit convert bundled:smollm2" in main_job
    assert test_command.endswith("python -m pytest")
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()
