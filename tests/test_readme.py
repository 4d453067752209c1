"""The README's usage example runs as written (keeps the README true)."""
import os
import re


def test_readme_usage_example_runs():
    path = os.path.join(os.path.dirname(__file__), "..", "README.md")
    text = open(path).read()
    m = re.search(r"## Use\n\n```python\n(.*?)```", text, re.S)
    assert m, "README has a '## Use' section with a python block"
    exec(compile(m.group(1), "README.md", "exec"), {})
