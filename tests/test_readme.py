"""The README's commands are what CI runs: `.ci/run` holds exactly the README's install, check and test lines."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def command_lines(text: str) -> list[str]:
    """Shell lines without comments, blank lines and the script's own set-up (``set``, ``cd``)."""
    lines = [line.split("  #")[0].strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith(("#", "set ", "cd "))]


def readme_shell_blocks() -> list[str]:
    readme = (REPO / "README.md").read_text()
    return [line for block in re.findall(r"```bash\n(.*?)```", readme, re.S) for line in command_lines(block)]


def test_ci_runs_exactly_the_readme_quick_start():
    ci = command_lines((REPO / ".ci" / "run").read_text())
    quick_start = readme_shell_blocks()[: len(ci)]
    assert ci == quick_start, "the README's first commands (install, checks, tests) and .ci/run must be the same"
    assert ci[0].startswith("pip install") and "metrank data fetch --for-tests" in ci[0]
    assert ci[-1] == "HF_HUB_OFFLINE=1 python -m pytest -q"


def extending_blocks() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Extending metrank") :]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_loss_and_miner_examples_work():
    import numpy as np
    import torch
    import torch.nn.functional as F

    from metrank.losses import LOSSES, create_loss
    from metrank.miners import MINERS, create_miner

    namespace: dict = {}
    loss_block, miner_block = extending_blocks()[:2]
    try:
        exec(loss_block, namespace)
        exec(miner_block, namespace)
        x = F.normalize(torch.randn(8, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64), dim=1)
        labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        value = create_loss("mean_margin", margin=0.5)(x, labels)
        s, y = (x @ x.T).numpy(), labels.numpy()
        expected = np.mean(
            [max(0.0, 0.5 + s[i][y != y[i]].mean() - s[i][(y == y[i]) & (np.arange(8) != i)].mean()) for i in range(8)]
        )
        assert abs(value.item() - expected) < 1e-12
        a, n = create_miner("hardest_negative_only", distance="cosine")(x, labels)
        masked = np.where(y[:, None] != y[None, :], s, -np.inf)
        assert a.tolist() == list(range(8)) and n.tolist() == masked.argmax(1).tolist()
    finally:
        LOSSES._entries.pop("mean_margin", None)
        MINERS._entries.pop("hardest_negative_only", None)
