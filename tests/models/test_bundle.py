"""Model bundles: safetensors + config + fingerprint, round-tripped and verified."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lookalike.models.bundle import INT8_SCALE, BundleError, int8_rows, load_bundle, save_bundle
from lookalike.models.network import EmbeddingConfig, EmbeddingNet
from lookalike.models.resolve import resolve_model


@pytest.fixture(scope="module")
def small_net() -> EmbeddingNet:
    torch.manual_seed(0)
    config = EmbeddingConfig(backbones=("efficientnet_lite0",), pooling="gem", head=(64,))
    return EmbeddingNet(config, pretrained=False).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))


def test_round_trip_gives_the_same_embeddings(
    small_net: EmbeddingNet, images: torch.Tensor, tmp_path: Path
) -> None:
    fingerprint = save_bundle(small_net, tmp_path / "m")
    loaded = load_bundle(tmp_path / "m")
    assert loaded.fingerprint == fingerprint
    assert loaded.config == small_net.config
    with torch.inference_mode():
        np.testing.assert_allclose(loaded.net(images), small_net(images), atol=1e-6)
        assert torch.allclose(loaded.net(images).norm(dim=1), torch.ones(2), atol=1e-5)


def test_fingerprint_is_stable(small_net: EmbeddingNet, tmp_path: Path) -> None:
    assert save_bundle(small_net, tmp_path / "a") == save_bundle(small_net, tmp_path / "b")


@pytest.mark.parametrize(("precision", "share", "fidelity"),
                         [("float16", 0.6, 0.999), ("int8", 0.35, 0.99)])
def test_reduced_precision_storage(small_net: EmbeddingNet, images: torch.Tensor,
                                   tmp_path: Path, precision: str, share: float,
                                   fidelity: float) -> None:
    """float16 halves the weights, int8 quarters the matrices; both load back as float32
    and embed nearly as the float32 net does."""
    save_bundle(small_net, tmp_path / precision, precision=precision)
    full = tmp_path / "full"
    save_bundle(small_net, full)
    assert (tmp_path / precision / "model.safetensors").stat().st_size < share * (
        full / "model.safetensors"
    ).stat().st_size
    loaded = load_bundle(tmp_path / precision)
    assert all(p.dtype == torch.float32 for p in loaded.net.state_dict().values()
               if p.is_floating_point())
    with torch.inference_mode():
        cosine = (loaded.net(images) * small_net(images)).sum(1)
    assert cosine.min() > fidelity


def test_int8_rows_round_trip_within_half_a_step() -> None:
    weight = torch.randn(5, 7, generator=torch.Generator().manual_seed(2))
    weight[3] = 0  # an all-zero row keeps a usable scale
    codes, scale = int8_rows(weight)
    assert codes.dtype == torch.int8 and scale.shape == (5,)
    back = codes.float() * scale[:, None]
    assert (back - weight).abs().max() <= scale.max() / 2 + 1e-7
    assert codes.abs().amax(dim=1)[[0, 1, 2, 4]].eq(127).all() and back[3].eq(0).all()


@pytest.mark.parametrize("damage", ["drop scale", "float codes", "orphan scale"])
def test_damaged_int8_weights_are_refused(small_net: EmbeddingNet, tmp_path: Path,
                                          damage: str) -> None:
    from safetensors.torch import load_file, save_file

    save_bundle(small_net, tmp_path / "m", precision="int8")
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(str(weights))
    scaled = next(key for key in state if key.endswith(INT8_SCALE))
    if damage == "drop scale":
        del state[scaled]
    elif damage == "float codes":
        base = scaled[: -len(INT8_SCALE)]
        state[base] = state[base].float()
    else:
        state["nothing.here" + INT8_SCALE] = torch.ones(3)
    save_file(state, str(weights))
    (tmp_path / "m" / "fingerprint").unlink()  # a re-signed damage, past the fingerprint
    with pytest.raises(BundleError, match="int8|scales without"):
        load_bundle(tmp_path / "m")


def test_unknown_precision_is_refused(small_net: EmbeddingNet, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="precision"):
        save_bundle(small_net, tmp_path / "m", precision="int4")
    assert not (tmp_path / "m").exists()


def test_tampered_weights_are_detected(small_net: EmbeddingNet, tmp_path: Path) -> None:
    save_bundle(small_net, tmp_path / "m")
    with open(tmp_path / "m" / "model.safetensors", "r+b") as handle:
        handle.seek(-1, 2)
        handle.write(b"\x01")
    with pytest.raises(BundleError, match="fingerprint"):
        load_bundle(tmp_path / "m")


def test_missing_file_and_bad_config(small_net: EmbeddingNet, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="config.json is missing"):
        load_bundle(tmp_path)
    save_bundle(small_net, tmp_path / "m")
    (tmp_path / "m" / "fingerprint").unlink()
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(dict(config, colour="blue")))
    with pytest.raises(BundleError, match="colour"):
        load_bundle(tmp_path / "m")


def test_weights_that_do_not_fit_the_config(small_net: EmbeddingNet, tmp_path: Path) -> None:
    save_bundle(small_net, tmp_path / "m")
    other = EmbeddingNet(EmbeddingConfig(head=(32,)), pretrained=False)
    save_bundle(other, tmp_path / "other")
    shutil.copy(tmp_path / "other" / "config.json", tmp_path / "m" / "config.json")
    (tmp_path / "m" / "fingerprint").unlink()
    with pytest.raises(BundleError, match="do not fit"):
        load_bundle(tmp_path / "m")


def test_resolve_model_rejects_nonsense(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="neither a model bundle"):
        resolve_model("no-such-model", tmp_path)


@pytest.fixture(scope="module")
def frozen_fusion() -> EmbeddingNet:
    """Two trunks with their offline ImageNet weights, untouched, and a trained-looking head."""
    torch.manual_seed(2)
    config = EmbeddingConfig(backbones=("efficientnet_lite0", "efficientnet_lite1"),
                             taps=(6,), head=(32,))
    return EmbeddingNet(config, pretrained=True).eval()


def test_unchanged_offline_trunks_are_referenced_not_stored(
    frozen_fusion: EmbeddingNet, images: torch.Tensor, tmp_path: Path
) -> None:
    from safetensors import safe_open

    save_bundle(frozen_fusion, tmp_path / "ref")
    save_bundle(frozen_fusion, tmp_path / "full", offline_trunks=False)
    config = json.loads((tmp_path / "ref" / "config.json").read_text())
    assert sorted(config["offline_trunks"]) == ["0", "1"]
    with safe_open(str(tmp_path / "ref" / "model.safetensors"), "pt") as stored:
        assert not any(key.startswith("trunks.") for key in stored.keys())  # noqa: SIM118
    sizes = {name: (tmp_path / name / "model.safetensors").stat().st_size
             for name in ("ref", "full")}
    assert sizes["ref"] < 0.05 * sizes["full"], sizes
    with torch.inference_mode():
        expected = frozen_fusion(images)
        for name in ("ref", "full"):
            np.testing.assert_allclose(load_bundle(tmp_path / name).net(images), expected,
                                       atol=1e-6)


def test_a_changed_trunk_is_stored_and_a_wrong_reference_refused(
    frozen_fusion: EmbeddingNet, tmp_path: Path
) -> None:
    tuned = EmbeddingNet(frozen_fusion.config, pretrained=False).eval()
    tuned.load_state_dict(frozen_fusion.state_dict())
    with torch.no_grad():
        next(tuned.trunks[1].parameters()).add_(0.01)  # fine-tuned: no longer the package's
    save_bundle(tuned, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert list(config["offline_trunks"]) == ["0"]
    # A reference whose digest is not the installed weights' (edited, fingerprint dropped).
    config["offline_trunks"]["0"]["sha256"] = "0" * 64
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    (tmp_path / "m" / "fingerprint").unlink()
    with pytest.raises(BundleError, match="other efficientnet_lite0 weights"):
        load_bundle(tmp_path / "m")
