import pytest
import torch

from molm_ds.monitor import MonitorConfig
from molm_ds.monitor.expert_load import SubLayer
from molm_ds.monitor.tags import parse_share_tag, per_expert_share_scalars


def test_every_expert_up_to_the_limit():
    sh = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    out = per_expert_share_scalars(SubLayer(3, "mlp"), sh, per_expert_max=4, top_k=1)
    assert out == {f"expert_share/L03/mlp/e{e:03d}": pytest.approx(v) for e, v in enumerate(sh.tolist())}
    assert parse_share_tag("expert_share/L03/mlp/e002") == (3, "mlp", 2)
    assert parse_share_tag("expert_share/L03/mlp/top1") is None


@pytest.mark.parametrize("E", [5, 64, 1000])
def test_top_bottom_k_beyond_the_limit_is_bounded(E):
    g = torch.Generator().manual_seed(E)
    sh = torch.rand(E, generator=g, dtype=torch.float64)
    sh /= sh.sum()
    out = per_expert_share_scalars(SubLayer(0, "attn"), sh, per_expert_max=4, top_k=3)
    assert len(out) == 4 * 3  # independent of E
    srt = sorted(range(E), key=lambda e: -float(sh[e]))
    for i in range(3):
        assert out[f"expert_share/L00/attn/top{i + 1}_id"] == srt[i]
        assert out[f"expert_share/L00/attn/top{i + 1}"] == pytest.approx(float(sh[srt[i]]))
        assert out[f"expert_share/L00/attn/bottom{i + 1}_id"] == srt[E - 1 - i]


def test_config_errors():
    with pytest.raises(ValueError, match="valid names"):
        MonitorConfig(peak_flops_name="tpu-v9")
    with pytest.raises(ValueError, match="extra"):
        MonitorConfig(heatmap_evry=5)
    assert MonitorConfig(peak_flops_name="a100-bf16").resolved_peak_flops() == 312e12
