"""The README's usage example runs as written (keeps the README true)."""
import os
import re


def test_readme_usage_example_runs():
    path = os.path.join(os.path.dirname(__file__), "..", "README.md")
    text = open(path).read()
    m = re.search(r"## Use\n\n```python\n(.*?)```", text, re.S)
    assert m, "README has a '## Use' section with a python block"
    exec(compile(m.group(1), "README.md", "exec"), {})


def test_readme_workflow_example_runs():
    path = os.path.join(os.path.dirname(__file__), "..", "README.md")
    text = open(path).read()
    m = re.search(r"## Workflow\n.*?```python\n(.*?)```", text, re.S)
    assert m, "README has a '## Workflow' section with a python block"
    scope = {}
    exec(compile(m.group(1), "README.md", "exec"), scope)
    assert scope["acc"] > 0.8 and set(scope["history"].history) >= {"loss", "val_loss",
                                                                    "accuracy", "val_f1"}
