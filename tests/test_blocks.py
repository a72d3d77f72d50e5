import pytest
import torch.nn as nn

from lamina import UsageError, find_blocks, select_taps
from lamina import testing as lt


@pytest.mark.parametrize("arch,container,final", [("bert", "encoder.layer", None), ("gpt2", "h", "ln_f"),
                                                  ("llama", "layers", "norm"), ("qwen2", "layers", "norm"),
                                                  ("mistral", "layers", "norm")])
def test_discovery_text(arch, container, final):
    bm = find_blocks(lt.tiny_hf_model(arch))
    assert bm.container == container and bm.n_blocks == 2
    assert bm.names[:3] == ["embed", "blocks.0", "blocks.1"]
    assert bm.taps[0].side == "input" and bm.taps[0].path == bm.block_paths[0]
    if final:
        assert bm.taps[-1].name == "final_norm" and bm.taps[-1].path == final
    else:
        assert "final_norm" not in bm.names


def test_discovery_with_head_prefix():
    bm = find_blocks(lt.tiny_hf_model("bert", head=True))
    assert bm.container == "bert.encoder.layer" and bm.head == "classifier"


def test_discovery_vit_and_cnn():
    bm = find_blocks(lt.tiny_hf_model("vit"))
    assert bm.n_blocks == 2 and bm.names[-1] == "final_norm"
    bm = find_blocks(lt.tiny_cnn())
    assert bm.container == "blocks" and bm.n_blocks == 4 and bm.head == "fc"


def test_user_named_blocks_path_and_glob():
    m = lt.tiny_cnn()
    assert find_blocks(m, "blocks").block_paths == ("blocks.0", "blocks.1", "blocks.2", "blocks.3")
    assert find_blocks(m, "blocks.*").block_paths == ("blocks.0", "blocks.1", "blocks.2", "blocks.3")
    seq = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2)))
    assert find_blocks(seq, "[12]").block_paths == ("1", "2")


def test_discovery_failure_lists_candidates():
    with pytest.raises(UsageError) as e:
        find_blocks(lt.no_stack())
    msg = str(e.value)
    assert "--blocks" in e.value.cli_text() and "body (2 x Linear/ReLU" in msg
    assert "--blocks" not in msg and "blocks" in msg  # the API names the argument, not the flag


def test_bad_block_names():
    with pytest.raises(UsageError, match="did you mean 'blocks'"):
        find_blocks(lt.tiny_cnn(), "blokcs")
    with pytest.raises(UsageError, match="matched no module"):
        find_blocks(lt.tiny_cnn(), "nothing.*")


def test_select_taps_semantics():
    bm = find_blocks(lt.tiny_hf_model("gpt2", layers=4))
    names = lambda sel: [t.name for t in select_taps(bm, sel)]  # noqa: E731
    assert names(None) == bm.names
    assert names(2) == ["blocks.2", "blocks.3"]
    assert names("2") == ["blocks.2", "blocks.3"]
    assert names([-1, 0]) == ["blocks.0", "blocks.3"]
    assert names("embed,blocks.-1") == ["embed", "blocks.3"]
    assert names("blocks.*") == [f"blocks.{i}" for i in range(4)]
    assert names(["final_norm"]) == ["final_norm"]
    with pytest.raises(UsageError, match="did you mean"):
        select_taps(bm, "blocks.O")
    with pytest.raises(UsageError):
        select_taps(bm, 9)
    with pytest.raises(UsageError):
        select_taps(bm, [7])


def test_one_block_model_found_when_config_says_so():
    bm = find_blocks(lt.tiny_hf_model("bert", layers=1))
    assert bm.container == "encoder.layer" and bm.n_blocks == 1
