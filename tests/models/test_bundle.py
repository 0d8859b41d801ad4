"""Model bundles: safetensors + config + fingerprint, round-tripped and verified."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lookalike.models.bundle import BundleError, load_bundle, save_bundle
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


def test_half_precision_storage(
    small_net: EmbeddingNet, images: torch.Tensor, tmp_path: Path
) -> None:
    save_bundle(small_net, tmp_path / "half", half=True)
    full = tmp_path / "full"
    save_bundle(small_net, full)
    assert (tmp_path / "half" / "model.safetensors").stat().st_size < 0.6 * (
        full / "model.safetensors"
    ).stat().st_size
    with torch.inference_mode():
        cosine = (load_bundle(tmp_path / "half").net(images) * small_net(images)).sum(1)
    assert cosine.min() > 0.999


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
