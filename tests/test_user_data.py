"""Your own data: a LightningDataModule by class_path (its contract checked), and imagefolder's image options."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lightning_repair.datamodule import ImageDataModule

from helpers import pipeline_config, read_metrics, run_fit, write_config


def user_data_config(tmp_path, dense_checkpoint, class_path: str) -> dict:
    config = pipeline_config(tmp_path, dense_checkpoint, rr_grid=[0.9])
    config["data"] = {"class_path": class_path, "init_args": {"size": 16, "calibration": 64, "test": 96}}
    return config


def test_a_datamodule_of_your_own_by_class_path(tmp_path, dense_checkpoint):
    with pytest.warns(UserWarning, match="RR profile from only 64"):
        run_fit(write_config(tmp_path / "config.yaml", user_data_config(tmp_path, dense_checkpoint,
                                                                        "user_data.TensorData")))  # fmt: skip
    metrics = read_metrics(tmp_path)
    assert metrics["calibration_samples"] == 64 and metrics["test_samples"] == 96
    assert metrics["data_config"] == {"class_path": "user_data.TensorData",
                                      "init_args": {"size": 16, "calibration": 64, "test": 96, "seed": 0}}  # fmt: skip
    assert metrics["sparsity"]["achieved"] == pytest.approx(0.9, abs=1e-4)


@pytest.mark.parametrize(
    ("class_path", "words"),
    [
        ("user_data.LabeledCalibration", ["LabeledCalibration.calibration_dataloader() gave (Tensor(32, 3, 16, 16), "
                                          "Tensor(32,)) as batch 0", "unlabeled image tensors"]),
        ("user_data.NoCalibration", ["NoCalibration has no calibration_dataloader()", "test_dataloader()"]),
    ],
)
def test_the_contract_is_checked_in_one_line(tmp_path, dense_checkpoint, capsys, class_path, words):
    config = user_data_config(tmp_path, dense_checkpoint, class_path)
    if class_path.endswith("NoCalibration"):
        del config["data"]["init_args"]
    with pytest.raises(SystemExit) as info:
        run_fit(write_config(tmp_path / "config.yaml", config))
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 1 and len(lines) == 1 and lines[0].startswith("lightning-repair: error: data: ")
    assert all(word in lines[0] for word in words), lines[0]


def test_search_on_a_datamodule_without_held_out_images_says_what_to_set(tmp_path, dense_checkpoint, capsys):
    config = user_data_config(tmp_path, dense_checkpoint, "user_data.TensorData")
    config["model"]["init_args"]["allocation"] = {"method": "search"}
    with pytest.raises(SystemExit) as info:
        run_fit(write_config(tmp_path / "config.yaml", config))
    err = capsys.readouterr().err.strip()
    assert info.value.code == 1 and "TensorData has no images outside its calibration set" in err
    assert "allocation.search.held_out_images: 0" in err
    config["model"]["init_args"]["allocation"] = {"method": "search", "search": {"held_out_images": 0,
                                                                                 "max_candidates": 3}}  # fmt: skip
    with pytest.warns(UserWarning, match="RR profile from only 64"):
        run_fit(write_config(tmp_path / "config.yaml", config))
    assert read_metrics(tmp_path)["search"]["candidates"] == 3


def test_imagefolder_image_options(tmp_path):
    for split in ("train", "val"):
        for label in ("a", "b"):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 30), (100 + 50 * i, 20, 200)).save(tmp_path / split / label / f"{i}.png")
    default = ImageDataModule("imagefolder", data_dir=str(tmp_path), augment=False, calibration_size=2)
    default.setup()
    assert default.test_set[0][0].shape == (3, 224, 224) and default.info.mean == (0.485, 0.456, 0.406)
    assert default.info.resize == 256
    dm = ImageDataModule("imagefolder", data_dir=str(tmp_path), augment=False, calibration_size=2, image_size=24,
                         resize=28, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))  # fmt: skip
    dm.setup()
    image, _ = dm.test_set[0]
    assert image.shape == (3, 24, 24) and dm.calibration_set[0].shape == (3, 24, 24)
    assert (dm.info.image_size, dm.info.resize, dm.info.mean, dm.info.num_classes) == (24, 28, (0.5,) * 3, 2)
    red = 100 / 255  # a uniform image: resizing and cropping keep its value, the normalisation is the given one
    torch.testing.assert_close(image[0], torch.full((24, 24), (red - 0.5) / 0.25), atol=2e-2, rtol=0)
    with pytest.raises(ValueError, match="data.image_size applies to imagefolder and imagenette only"):
        ImageDataModule("fashion_mnist", image_size=32)
    with pytest.raises(ValueError, match=r"data.mean needs one value per channel \(3\)"):
        ImageDataModule("imagefolder", mean=(0.5,))
