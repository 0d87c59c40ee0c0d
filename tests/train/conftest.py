import pytest

from finevit.data.synth import SynthConfig, generate


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A small synthetic dataset (~3 s to make): 8 train shards of 24 samples, 1 val shard of 24."""
    root = tmp_path_factory.mktemp("synth") / "data"
    generate(root, SynthConfig(train=192, val=24, shard_size=24, max_side=256), workers=1, progress=False)
    return root
