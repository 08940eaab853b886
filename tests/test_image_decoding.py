"""Image-folder files are decoded as an image viewer shows them (Pillow, EXIF orientation applied),
through the pipeline's own paths: the verification pass, the trainer's indexed loader and the
evaluation arrays. Every file is generated here with Pillow (no fixtures, no network).

The reference is `ImageOps.exif_transpose(Image.open(path)).convert("RGB")`, except for 16-bit grey,
where Pillow's convert clips at 255; there the reference is the high byte of the values written
(what Pillow itself does for 16-bit RGB, RGBA and grey+alpha PNGs, checked below)."""
import io
import logging
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import ExifTags, Image, ImageOps

from input_pipeline import pipeline, sources
from test_sources import CLASSES, folder_config, make_image_folder
from vit_accel.errors import UserError

SIZE = 32                   # square files: eval_arrays at this size keeps their pixels
ORIENTED = (24, 40)         # (height, width) of the EXIF-rotated JPEGs as stored


def reference(path) -> np.ndarray:
  with warnings.catch_warnings():  # palette + transparency: Pillow suggests RGBA; RGB is the point
    warnings.simplefilter("ignore", UserWarning)
    return np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))


def colour_image(h, w, seed) -> np.ndarray:
  """Smooth gradients plus noise: every channel differs, so a swapped axis or channel shows."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:h, :w]
  base = np.stack([yy * 255 // max(h - 1, 1), xx * 255 // max(w - 1, 1),
                   (yy + xx) * 255 // (h + w - 2)], axis=-1)
  return np.clip(base + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)


def png16(a: np.ndarray, colour_type: int) -> bytes:
  """A 16-bit PNG by hand (Pillow writes 16-bit only for grey): colour type 0 grey, 2 RGB,
  4 grey+alpha, 6 RGBA."""
  h, w = a.shape[:2]
  raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))
  chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data +
                              struct.pack(">I", zlib.crc32(kind + data)))
  return (b"\x89PNG\r\n\x1a\n" +
          chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)) +
          chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def palette_image(seed, size=SIZE, colours=256) -> Image.Image:
  """A 'P' image whose palette is a random permutation of colours, so decoding the indices as
  pixels (the old bug) is far from the true colours."""
  rng = np.random.default_rng(seed)
  image = Image.fromarray(rng.integers(0, colours, (size, size), dtype=np.uint8), "P")
  image.putpalette(rng.integers(0, 256, 3 * 256, dtype=np.uint8).tobytes())
  return image


def write_all_formats(folder: str) -> dict:
  """Every listed format in `folder`; returns {file name: expected uint8 [H, W, 3]} (None: the
  Pillow reference)."""
  os.makedirs(folder, exist_ok=True)
  rgb = colour_image(SIZE, SIZE, 0)
  grey = rgb[..., 1]
  rng = np.random.default_rng(1)
  rgba = np.concatenate([rgb, rng.integers(0, 256, (SIZE, SIZE, 1), dtype=np.uint8)], axis=-1)
  expected = {}

  def save(name, image, **kw):
    image.save(os.path.join(folder, name), **kw)
    expected[name] = None

  for k in range(1, 9):  # every EXIF orientation, on a non-square JPEG
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = k
    save(f"jpeg_orientation{k}.jpg", Image.fromarray(colour_image(*ORIENTED, k)), exif=exif,
         quality=95)
  save("jpeg_rgb.jpeg", Image.fromarray(rgb), quality=90)
  save("jpeg_grey.jpg", Image.fromarray(grey, "L"))
  save("jpeg_cmyk.jpg", Image.fromarray(rgba, "RGBA").convert("CMYK"))
  save("png_rgb.png", Image.fromarray(rgb))
  save("png_grey.png", Image.fromarray(grey, "L"))
  save("png_grey_alpha.png", Image.fromarray(rgba[..., 2:], "LA"))
  save("png_rgba.png", Image.fromarray(rgba, "RGBA"))
  save("png_palette.png", palette_image(2))
  alphas = bytes(rng.integers(0, 256, 256, dtype=np.uint8))
  save("png_palette_alpha.png", palette_image(3), transparency=alphas)   # tRNS per entry
  save("png_palette_key.png", palette_image(4), transparency=7)          # one transparent index
  exif = Image.Exif()
  exif[ExifTags.Base.Orientation] = 6
  save("png_rgb_exif6.png", Image.fromarray(colour_image(*ORIENTED, 9)), exif=exif)
  save("bmp_rgb24.bmp", Image.fromarray(rgb))
  save("bmp_palette8.bmp", palette_image(5))
  save("bmp_1bit.bmp", Image.fromarray(grey > 128))
  frames = [palette_image(6 + i, colours=64) for i in range(3)]
  save("gif_animated.gif", frames[0], save_all=True, append_images=frames[1:], duration=50)
  save("webp_lossy.webp", Image.fromarray(rgb), quality=80)
  save("webp_lossless_rgba.webp", Image.fromarray(rgba, "RGBA"), lossless=True)
  save("tiff_rgb.tif", Image.fromarray(rgb))
  save("tiff_palette.tiff", palette_image(9))
  for name, colour_type, channels in (("png_rgb16.png", 2, 3), ("png_rgba16.png", 6, 4),
                                      ("png_grey_alpha16.png", 4, 2)):
    with open(os.path.join(folder, name), "wb") as f:
      f.write(png16(rng.integers(0, 65536, (SIZE, SIZE, channels), dtype=np.uint16), colour_type))
    expected[name] = None
  for name, fmt in (("png_grey16.png", "PNG"), ("tiff_grey16.tif", "TIFF")):
    values = rng.integers(0, 65536, (SIZE, SIZE), dtype=np.uint16)
    Image.fromarray(values).save(os.path.join(folder, name), fmt)  # mode I;16
    expected[name] = np.repeat((values >> 8).astype(np.uint8)[..., None], 3, axis=-1)
  return expected


def decoded_by_trainer(source) -> np.ndarray:
  """What train_dataset augments: the trainer's index -> image loader, back to uint8."""
  load = pipeline._indexed_images(source, 0, source.num_examples)
  ds = tf.data.Dataset.range(source.num_examples).map(load)
  return [np.round(x * 255).astype(np.uint8) for x in ds.as_numpy_iterator()]


def decoded_by_dataset(paths) -> list:
  ds = tf.data.Dataset.from_tensor_slices(paths).map(pipeline.decode_image_file)
  return list(ds.as_numpy_iterator())


def test_every_format_decodes_as_pillow_shows_it_through_the_pipeline(tmp_path):
  root = str(tmp_path / "data")
  expected = write_all_formats(os.path.join(root, "train", "mixed"))
  make_image_folder(root, per_class=(0, 2), corrupt=False, empty_test_class=False)
  with open(os.path.join(root, "train", "mixed", "bmp_palette8.bmp"), "rb") as f:
    assert struct.unpack("<H", f.read(30)[28:30])[0] == 8   # really a palette BMP
  with open(os.path.join(root, "train", "mixed", "bmp_1bit.bmp"), "rb") as f:
    assert struct.unpack("<H", f.read(30)[28:30])[0] == 1   # really a 1-bit BMP

  source = pipeline.load_source(folder_config(root), "train")   # verification pass keeps all
  names = [os.path.basename(os.fsdecode(p)) for p in source.paths]
  assert sorted(names) == sorted(expected)
  for route, images in (("trainer", decoded_by_trainer(source)),
                        ("dataset", decoded_by_dataset(source.paths))):
    for name, path, image in zip(names, source.paths, images):
      want = reference(path) if expected[name] is None else expected[name]
      assert image.dtype == np.uint8 and image.shape == want.shape, (route, name, image.shape)
      np.testing.assert_array_equal(image, want, err_msg=f"{route}: {name}")

  # Orientation really turned the pictures (5-8 swap height and width), and the first GIF frame
  # is not another frame.
  by_name = dict(zip(names, decoded_by_dataset(source.paths)))
  assert by_name["jpeg_orientation1.jpg"].shape[:2] == ORIENTED
  for k in (5, 6, 7, 8):
    assert by_name[f"jpeg_orientation{k}.jpg"].shape[:2] == ORIENTED[::-1]
  assert by_name["png_rgb_exif6.png"].shape[:2] == ORIENTED[::-1]
  gif = Image.open(os.path.join(root, "train", "mixed", "gif_animated.gif"))
  gif.seek(1)
  assert not np.array_equal(by_name["gif_animated.gif"], np.asarray(gif.convert("RGB")))
  # 16-bit RGB / RGBA / grey+alpha: Pillow keeps the high byte, which is what 16-bit grey gets too.
  with open(os.path.join(root, "train", "mixed", "png_rgb16.png"), "rb") as f:
    assert Image.open(io.BytesIO(f.read())).mode == "RGB"
  assert by_name["png_grey16.png"].min() < 64   # Pillow's convert("RGB") would be ~all 255

  # The evaluation arrays: square files at their own size come out unresampled.
  images, labels = pipeline.eval_arrays(source, SIZE, -1, seed=0)
  assert images.shape == (source.num_examples, SIZE, SIZE, 3) and images.dtype == np.uint8
  for name, path, image in zip(names, source.paths, images):
    want = reference(path) if expected[name] is None else expected[name]
    if want.shape[:2] == (SIZE, SIZE):
      np.testing.assert_array_equal(image, want, err_msg=f"eval_arrays: {name}")


def test_nested_subfolders_are_used_with_the_top_folder_as_class(tmp_path, caplog):
  root = make_image_folder(str(tmp_path), per_class=(24, 8), corrupt=False)  # 72 train images
  moves = {"circle": ["batch2"], "square": ["a", "b", "c"], "stripes": ["x"]}
  for cls, parts in moves.items():
    nested = os.path.join(root, "train", cls, *parts)
    os.makedirs(nested)
    for i in range(0, 24, 3):   # a third of each class moves down
      name = next(f for f in os.listdir(os.path.join(root, "train", cls))
                  if f.startswith(f"{i:03d}"))
      os.rename(os.path.join(root, "train", cls, name), os.path.join(nested, name))
  on_disk = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, "train")) for f in fs]
  assert len(on_disk) == 72
  # Left out and counted: hidden files and folders, a note, a file outside any class folder.
  hidden = os.path.join(root, "train", "circle", ".thumbnails")
  os.makedirs(hidden)
  Image.new("RGB", (8, 8)).save(os.path.join(hidden, "t.png"))
  open(os.path.join(root, "train", "square", "a", ".DS_Store"), "wb").close()
  open(os.path.join(root, "train", "stripes", "x", "README.txt"), "w").close()
  Image.new("RGB", (8, 8)).save(os.path.join(root, "train", "stray.png"))

  files, warnings = sources.index_image_folder(root, "train")
  assert files.num_examples == 72
  assert sorted(os.fsdecode(p) for p in files.paths) == sorted(on_disk)
  for path, label in zip(files.paths, files.labels):
    relative = os.path.relpath(os.fsdecode(path), os.path.join(root, "train"))
    assert CLASSES[label] == relative.split(os.sep)[0]
  assert np.bincount(files.labels).tolist() == [24, 24, 24]
  assert list(files.paths) == sorted(files.paths)   # one bytewise order on every host
  again, _ = sources.index_image_folder(root, "train")
  np.testing.assert_array_equal(files.paths, again.paths)
  assert any(w.startswith("2 hidden file(s) or folder(s)") and "circle/.thumbnails" in w
             for w in warnings)
  assert any(w.startswith("1 non-image file(s)") and "README.txt" in w for w in warnings)
  assert any(w.startswith("1 file(s) outside any class folder") and "stray.png" in w
             for w in warnings)

  cfg = folder_config(root)
  with caplog.at_level(logging.WARNING):
    source = pipeline.load_source(cfg, "train")
  assert source.num_examples == 72
  assert "hidden file(s) or folder(s)" in caplog.text
  stream = pipeline.train_dataset(source, cfg, pipeline.HostShard(0, 1, 16))
  batch = next(stream.as_numpy_iterator())
  assert batch["views"][0].shape == (16, 32, 32, 3)


def test_file_names_that_are_not_utf8_are_read(tmp_path, caplog):
  root = make_image_folder(str(tmp_path), per_class=(2, 2), corrupt=False)
  folder = os.fsencode(os.path.join(root, "train", "circle"))
  good, broken = os.path.join(folder, b"\xff\xfe.png"), os.path.join(folder, b"\xfe\xff-bad.png")
  image = Image.fromarray(colour_image(SIZE, SIZE, 3))
  encoded = io.BytesIO()
  image.save(encoded, "PNG")
  try:
    for path, data in ((good, encoded.getvalue()), (broken, b"\x89PNG\r\n\x1a\nbroken")):
      fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      with os.fdopen(fd, "wb") as f:
        f.write(data)
  except (OSError, UnicodeError) as e:
    pytest.skip(f"this filesystem refuses a non-UTF-8 file name: {e}")

  with caplog.at_level(logging.WARNING):
    source = pipeline.load_source(folder_config(root), "train")
  assert good in list(source.paths) and broken not in list(source.paths)
  assert r"\xfe\xff-bad.png" in caplog.text   # the skipped one, named legibly
  index = list(source.paths).index(good)
  np.testing.assert_array_equal(decoded_by_dataset(source.paths[index:index + 1])[0],
                                reference(good))
  np.testing.assert_array_equal(decoded_by_trainer(source)[index], np.asarray(image))
  with pytest.raises(UserError, match=r"\\xfe\\xff-bad\.png is not a readable image"):
    pipeline.load_source(folder_config(root, bad_images="fail"), "train")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_corrupt_files_are_skipped_or_fail_with_counts_by_reason(tmp_path, caplog, monkeypatch):
  root = make_image_folder(str(tmp_path), per_class=(6, 2))   # + broken.png, notes.txt
  circle = os.path.join(root, "train", "circle")
  Image.fromarray(colour_image(SIZE, SIZE, 4)).save(os.path.join(circle, "whole.jpg"))
  with open(os.path.join(circle, "whole.jpg"), "rb") as f:
    data = f.read()
  with open(os.path.join(circle, "cut.jpg"), "wb") as f:
    f.write(data[:len(data) // 2])                      # truncated JPEG
  with open(os.path.join(circle, "text.png"), "w") as f:
    f.write("not an image at all\n")                    # an image name, text inside
  Image.new("L", (64, 64)).save(os.path.join(circle, "huge.png"))
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)   # 4096 px > 2 * 1000: a "bomb"

  with caplog.at_level(logging.WARNING):
    kept = pipeline.load_source(folder_config(root), "train")
  assert kept.num_examples == 3 * 6 + 1                 # + whole.jpg
  names = {os.path.basename(os.fsdecode(p)) for p in kept.paths}
  assert not names & {"broken.png", "cut.jpg", "text.png", "huge.png"}
  line = next(l for l in caplog.text.splitlines() if "skipped 4 of 23 files" in l)
  assert "2 corrupt or truncated (first: " in line and "broken.png" in line
  assert "1 not an image Pillow recognises (first: " in line and "text.png" in line
  assert "1 over Pillow's decompression-bomb pixel limit (first: " in line and "huge.png" in line
  assert "1 non-image file(s)" in caplog.text and "notes.txt" in caplog.text

  with pytest.raises(UserError, match=r"broken\.png is not a readable image \(corrupt or truncated"
                                      r".*4 such file\(s\)"):
    pipeline.load_source(folder_config(root, bad_images="fail"), "train")


def test_a_folder_of_nothing_readable_is_one_clear_error(tmp_path):
  root = str(tmp_path)
  for split in ("train", "test"):
    os.makedirs(os.path.join(root, split, "a"))
    with open(os.path.join(root, split, "a", "x.png"), "wb") as f:
      f.write(b"garbage")
  with pytest.raises(UserError, match=r"none of the 1 files under .*train/a is a readable image"):
    pipeline.load_source(folder_config(root), "train")
