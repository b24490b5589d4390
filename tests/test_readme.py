"""CI runs the README's two commands verbatim: keep them in sync."""
from pathlib import Path
import re

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    setup, tests = blocks[0].strip(), blocks[1].strip()
    assert "linbench run" in setup and "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert setup in ci and tests in ci
