import numpy as np
import pytest
from PIL import Image

from covidscan.data.io import ImageReadError, read_bytes, read_image
from tests.conftest import write_dicom


@pytest.fixture
def gradient():
    return np.tile(np.arange(16, dtype=np.uint8) * 16, (8, 1))  # 8 x 16, values 0..240


def test_png_8bit_gray(tmp_path, gradient):
    Image.fromarray(gradient, mode="L").save(tmp_path / "a.png")
    scan = read_image(tmp_path / "a.png")
    assert scan.pixels.dtype == np.float32 and scan.pixels.shape == (8, 16)
    assert scan.format == "PNG" and scan.mode == "L"
    np.testing.assert_allclose(scan.pixels, gradient / 255.0, atol=1e-6)


def test_png_16bit(tmp_path):
    arr = np.array([[0, 1000, 65535]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(arr).save(tmp_path / "a16.png")
    scan = read_image(tmp_path / "a16.png")
    assert scan.pixels.shape == (4, 3)
    np.testing.assert_allclose(scan.pixels[0], [0, 1000 / 65535, 1.0], atol=1e-6)


def test_rgb_equal_channels_becomes_gray_and_colour_stays(tmp_path, gradient):
    rgb = np.stack([gradient] * 3, axis=-1)
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "g.png")
    assert read_image(tmp_path / "g.png").pixels.ndim == 2
    rgb2 = rgb.copy()
    rgb2[0, 0] = (255, 0, 0)  # a red marker
    Image.fromarray(rgb2, mode="RGB").save(tmp_path / "c.png")
    scan = read_image(tmp_path / "c.png")
    assert scan.pixels.shape == (8, 16, 3) and scan.is_color
    np.testing.assert_allclose(scan.pixels[0, 0], [1, 0, 0])


def test_rgba_composited_on_black(tmp_path, gradient):
    rgba = np.stack([gradient] * 3 + [np.full_like(gradient, 255)], axis=-1)
    rgba[:, :8, 3] = 0  # left half transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    scan = read_image(tmp_path / "a.png")
    assert scan.mode == "RGBA" and scan.pixels.ndim == 2
    assert np.all(scan.pixels[:, :8] == 0)
    np.testing.assert_allclose(scan.pixels[:, 8:], gradient[:, 8:] / 255.0, atol=1e-6)


def test_palette(tmp_path, gradient):
    Image.fromarray(gradient, mode="L").convert("P").save(tmp_path / "p.png")
    scan = read_image(tmp_path / "p.png")
    assert scan.mode == "P"
    np.testing.assert_allclose(scan.pixels, gradient / 255.0, atol=1.5 / 255)


def test_jpeg(tmp_path, gradient):
    Image.fromarray(gradient, mode="L").save(tmp_path / "a.jpg", quality=95)
    scan = read_image(tmp_path / "a.jpg")
    assert scan.format == "JPEG" and scan.pixels.shape == (8, 16)
    assert np.abs(scan.pixels - gradient / 255.0).max() < 0.06


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_rescale_and_photometric(tmp_path, photometric):
    stored = np.array([[0, 100, 200, 300]], dtype=np.uint16).repeat(3, axis=0)
    path = write_dicom(tmp_path / "x.dcm", stored, photometric=photometric, slope=2.0, intercept=-1024)
    scan = read_image(path)
    assert scan.format == "DICOM" and scan.mode == photometric
    expected = np.array([0, 1 / 3, 2 / 3, 1.0])  # min-max of 2*v-1024 is linear in v
    if photometric == "MONOCHROME1":
        expected = 1 - expected
    np.testing.assert_allclose(scan.pixels[0], expected, atol=1e-6)


def test_dicom_window_applied(tmp_path):
    stored = np.array([[0, 40, 80, 1000]], dtype=np.uint16).repeat(2, axis=0)
    scan = read_image(write_dicom(tmp_path / "w.dcm", stored, window=(40.0, 80.0)))
    # window [0, 80]: the 1000 value saturates like 80 does
    assert scan.pixels[0, 2] == pytest.approx(scan.pixels[0, 3], abs=0.02)
    assert scan.pixels[0, 0] < scan.pixels[0, 1] < scan.pixels[0, 2]


def test_dicom_without_suffix_is_sniffed(tmp_path):
    stored = np.arange(12, dtype=np.uint16).reshape(3, 4)
    write_dicom(tmp_path / "noext", stored)
    assert read_image(tmp_path / "noext").format == "DICOM"


def test_truncated_png_names_file(tmp_path, gradient):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="t.png"):
        read_image(tmp_path / "t.png")


def test_text_named_png(tmp_path):
    (tmp_path / "fake.png").write_text("not an image")
    with pytest.raises(ImageReadError, match=r"fake\.png: not a readable image"):
        read_image(tmp_path / "fake.png")


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_image("nope.png")


def test_decompression_bomb_guard_stays_on(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((40, 40), dtype=np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises((ImageReadError, Image.DecompressionBombError), match="big.png|pixels"):
        read_image(tmp_path / "big.png")


def test_read_bytes_sniffs_content(tmp_path, gradient):
    Image.fromarray(gradient, mode="L").save(tmp_path / "a.png")
    assert read_bytes((tmp_path / "a.png").read_bytes(), "scan.dcm").format == "PNG"
    with pytest.raises(ImageReadError, match="upload.png"):
        read_bytes(b"hello world" * 10, "upload.png")


def test_upload_errors_name_the_upload_not_python_objects():
    with pytest.raises(ImageReadError) as exc:
        read_bytes(b"plain text, not an image" * 4, name="scan.png")
    assert "scan.png" in str(exc.value) and "BytesIO" not in str(exc.value) and "0x" not in str(exc.value)


def _png_bytes(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_pixel_limit_checked_from_the_header_for_every_format(tmp_path, monkeypatch):
    bomb = _png_bytes(Image.new("1", (6000, 6000)))  # a few KB that would decode to 36 megapixels
    assert len(bomb) < 100_000
    with pytest.raises(ImageReadError, match="too large: 6000 x 6000"):
        read_bytes(bomb, name="bomb.png")
    with pytest.raises(ImageReadError, match="too large"):
        read_bytes(_png_bytes(Image.new("L", (9000, 9000))), name="big.png")
    # DICOM: rows x columns from the header, refused before the pixel data are decoded
    path = write_dicom(tmp_path / "d.dcm", np.zeros((8, 8), np.uint16))
    import pydicom

    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 10000, 10000
    ds.save_as(tmp_path / "huge.dcm")
    with pytest.raises(ImageReadError, match="too large: 10000 x 10000"):
        read_image(tmp_path / "huge.dcm")
    monkeypatch.setenv("COVIDSCAN_MAX_PIXELS", "40000000")
    monkeypatch.setenv("COVIDSCAN_MAX_IMAGE_MB", "200")  # and the memory budget (144 MB as float32)
    assert read_bytes(bomb, name="bomb.png").width == 6000  # the limit is configurable


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "WEBP", "ICO", "PCX"])
def test_only_png_jpeg_tiff_and_dicom_are_decoded(fmt):
    import io

    buf = io.BytesIO()
    Image.new("L", (32, 32), 100).save(buf, format=fmt)
    with pytest.raises(ImageReadError, match="not a readable image: PNG, JPEG, TIFF or DICOM expected"):
        read_bytes(buf.getvalue(), name=f"x.{fmt.lower()}")


def test_eps_is_never_handed_to_ghostscript(monkeypatch):
    import subprocess

    def refuse(*a, **k):
        raise AssertionError("a subprocess was started")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(ImageReadError, match="not a readable"):
        read_bytes(eps, name="x.eps")
