"""The one data table of `fsbench data`: where each dataset's files come from, their checksums,
and the split sizes a correct copy must have.

Sources, per column:
- URLs and md5s of image archives: torchvision 0.29's dataset downloaders
  (torchvision/datasets/{caltech,oxford_iiit_pet,flowers102,food101,fgvc_aircraft,sun397,dtd,
  eurosat}.py), which moved Caltech101 to data.caltech.edu and EuroSAT to Hugging Face after
  the original hosts went away. FGVC-Aircraft has no published checksum (torchvision passes none).
- Google Drive ids of CoOp's `split_zhou_*.json`, ImageNet's `classnames.txt` and UCF101's
  mid-frames zip: KaiyangZhou/CoOp DATASETS.md. No checksums are published for them; a split
  file is checked by parsing it with fsbench's reader instead.
- Expected train/val/test sizes: the dataset table of CoOp (Zhou et al., "Learning to Prompt
  for Vision-Language Models", IJCV 2022), which CLIP-LoRA (Zanella & Ben Ayed, CVPRW 2024)
  evaluates on unchanged. ImageNet: 1,281,167 train images (the official train set, which our
  reader splits 90/10 into train and val) and the 50,000 official val images as test.
- Manual steps: Stanford Cars' official links are dead (KaiyangZhou/CoOp issue 61,
  pytorch/vision issue 7545); ImageNet needs an account at image-net.org.
- The domain-generalisation targets (test only, so expected = (0, 0, test)): the archives the
  authors link (ImageNet-A/R: hendrycks/natural-adv-examples and hendrycks/imagenet-r READMEs;
  Sketch: the Google Drive file of HaohanWang/ImageNet-Sketch's README; V2: the Hugging Face copy
  of modestyachts/ImageNetV2's matched-frequency tarball, as its imagenetv2_pytorch loader and
  TFDS use, since the S3 bucket in CoOp's DATASETS.md line 187 has been unreliable). sha256s and
  sizes: tensorflow/datasets, tensorflow_datasets/datasets/imagenet_{a,r,v2,sketch}/checksums.tsv;
  the A/R md5s agree with several torchvision-style loaders (e.g. ENSTA-U2IS-AI/torch-uncertainty,
  torch_uncertainty/datasets/imagenet/imagenet_{a,r}.py). Not re-downloaded here to confirm them.
  Counts: V2 10,000; Sketch 50,889; A 7,500; R 30,000, the sizes reported for the released
  archives (not recounted here). Each also fetches CoOp's classnames.txt into its folder, where
  CoOp's readers look for it.
- The OOD sets of the `ood` protocol (test only): MOS's iNaturalist / SUN / Places subsets at the
  URLs of deeplearning-wisc/large_scale_ood's README (lines 38-42; no checksum published), extracted
  into MCM's `ImageNet_OOD_dataset/` (each tar holds `<Name>/images/`); Textures is DTD's own
  archive (the `dtd` row's), read from `dtd/images/`. Counts: 10,000 each and DTD's 5,640 (MOS's
  README lines 36-45).
"""

from __future__ import annotations

from dataclasses import dataclass

# Google Drive's download endpoint; a module constant so tests can point it at a local server.
DRIVE_URL = "https://drive.google.com/uc"


@dataclass(frozen=True)
class Download:
    """One file to fetch.

    Attributes:
        filename: the file's name on disk (archives are deleted after extraction).
        url: an http(s) URL; empty when `drive_id` is set.
        drive_id: a Google Drive file id (fetched through `DRIVE_URL` with the confirm step).
        md5, sha256: published checksums, None when none is published.
        save_to: folder under the data root the file is saved in (plain files), or the folder
            an archive is extracted into.
        extract: whether the file is a tar/zip archive to extract.
        inner: archives inside the extracted tree (paths relative to the data root) to extract
            in place and then delete, e.g. Caltech101's zip holding a tar.gz.
    """

    filename: str
    url: str = ""
    drive_id: str = ""
    md5: str | None = None
    sha256: str | None = None
    save_to: str = ""
    extract: bool = False
    inner: tuple[str, ...] = ()

    def resolved_url(self) -> str:
        return f"{DRIVE_URL}?export=download&id={self.drive_id}" if self.drive_id else self.url

    def checksum(self) -> tuple[str, str] | None:
        """(algorithm, hex digest) of the strongest published checksum, or None."""
        if self.sha256:
            return "sha256", self.sha256
        return ("md5", self.md5) if self.md5 else None


@dataclass(frozen=True)
class DatasetSource:
    """How to obtain one dataset, and what a complete copy holds.

    Attributes:
        name: registry name.
        downloads: files fetched automatically, in order.
        moves: (from, to) renames under the data root after extraction; the archive's top
            folder that held `from` is then deleted (CoOp: "keep only data/").
        manual: steps a person must do (empty when `fsbench data prepare` does everything).
        expected: (train, val, test) image counts of the standard split.
        classes: number of classes of the standard split.
    """

    name: str
    downloads: tuple[Download, ...]
    expected: tuple[int, int, int]
    classes: int
    moves: tuple[tuple[str, str], ...] = ()
    manual: str = ""


def _split(name: str, folder: str, drive_id: str) -> Download:
    return Download(f"split_zhou_{name}.json", drive_id=drive_id, save_to=folder)


def _imagenet_classnames(folder: str) -> Download:
    """CoOp's ImageNet classnames.txt (DATASETS.md), copied into a variant's folder as CoOp does."""
    return Download("classnames.txt", drive_id="1-61f_ol79pViBFDG_IDlUQSwoLcn2XXF", save_to=folder)


VGG = "https://www.robots.ox.ac.uk/~vgg/data"
HENDRYCKS = "https://people.eecs.berkeley.edu/~hendrycks"
MOS = "http://pages.cs.wisc.edu/~huangrui/imagenet_ood_dataset"
DTD_ARCHIVE = Download("dtd-r1.0.1.tar.gz", url=f"{VGG}/dtd/download/dtd-r1.0.1.tar.gz",
                       md5="fff73e5086ae6bdbea199a49dfb8a4c1", extract=True)


def _mos(name: str, folder: str) -> DatasetSource:
    """One of MOS's 10,000-image OOD subsets, extracted where MCM reads it."""
    return DatasetSource(
        name, (Download(f"{folder}.tar.gz", url=f"{MOS}/{folder}.tar.gz", save_to="ImageNet_OOD_dataset",
                        extract=True),),
        expected=(0, 0, 10_000), classes=1,
    )

SOURCES: dict[str, DatasetSource] = {s.name: s for s in (
    DatasetSource(
        "imagenet",
        (Download("classnames.txt", drive_id="1-61f_ol79pViBFDG_IDlUQSwoLcn2XXF", save_to="imagenet"),),
        expected=(1_281_167, 0, 50_000), classes=1000,
        manual=(
            "ImageNet needs an account: sign in at https://image-net.org/download-images.php, download "
            "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar, and extract them so that "
            "{root}/imagenet/images/train/<wnid>/*.JPEG and {root}/imagenet/images/val/<wnid>/*.JPEG exist "
            "(the val images must be sorted into wnid folders, e.g. with the valprep.sh script of "
            "soumith/imagenetloader.torch). classnames.txt is fetched by this command."
        ),
    ),
    DatasetSource(
        "caltech101",
        (Download("caltech-101.zip", url="https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip",
                  md5="3138e1922a9193bfa496528edbbc45d0", extract=True,
                  inner=("caltech-101/101_ObjectCategories.tar.gz",)),
         _split("Caltech101", "caltech-101", "1hyarUivQE36mY6jSomru6Fjd-JzwcCzN")),
        expected=(4_128, 1_649, 2_465), classes=100,
    ),
    DatasetSource(
        "oxford_pets",
        (Download("images.tar.gz", url=f"{VGG}/pets/data/images.tar.gz",
                  md5="5c4f3ee8e5d25df40f4fd59a7f44e54c", save_to="oxford_pets", extract=True),
         _split("OxfordPets", "oxford_pets", "1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs")),
        expected=(2_944, 736, 3_669), classes=37,
    ),
    DatasetSource(
        "stanford_cars",
        (_split("StanfordCars", "stanford_cars", "1ObCFbaAgVu0I-k_Au-gIUcefirdAuizT"),),
        expected=(6_509, 1_635, 8_041), classes=196,
        manual=(
            "Stanford Cars' official links (ai.stanford.edu/~jkrause/car196) are dead (KaiyangZhou/CoOp "
            "issue 61, pytorch/vision issue 7545). Get cars_train/ and cars_test/ from a mirror you trust "
            "(e.g. the Kaggle copy named in those issues) and put them in {root}/stanford_cars/ so that "
            "{root}/stanford_cars/cars_train/00001.jpg exists. The split file is fetched by this command."
        ),
    ),
    DatasetSource(
        "oxford_flowers",
        (Download("102flowers.tgz", url=f"{VGG}/flowers/102/102flowers.tgz",
                  md5="52808999861908f626f3c1f4e79d11fa", save_to="oxford_flowers", extract=True),
         _split("OxfordFlowers", "oxford_flowers", "1Pp0sRXzZFZq15zVOzKjKBu4A9i01nozT")),
        expected=(4_093, 1_633, 2_463), classes=102,
    ),
    DatasetSource(
        "food101",
        (Download("food-101.tar.gz", url="http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz",
                  md5="85eeb15f3717b99a5da872d97d918f87", extract=True),
         _split("Food101", "food-101", "1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl")),
        expected=(50_500, 20_200, 30_300), classes=101,
    ),
    DatasetSource(
        "fgvc_aircraft",
        (Download("fgvc-aircraft-2013b.tar.gz", url=f"{VGG}/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",
                  extract=True),),
        expected=(3_334, 3_333, 3_333), classes=100,
        moves=(("fgvc-aircraft-2013b/data", "fgvc_aircraft"),),
    ),
    DatasetSource(
        "sun397",
        (Download("SUN397.tar.gz", url="http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz",
                  md5="8ca2778205c41d23104230ba66911c7a", save_to="sun397", extract=True),
         _split("SUN397", "sun397", "1y2RD81BYuiyvebdN-JymPfyWYcd8_MUq")),
        expected=(15_880, 3_970, 19_850), classes=397,
    ),
    DatasetSource(
        "dtd",
        (DTD_ARCHIVE, _split("DescribableTextures", "dtd", "1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x")),
        expected=(2_820, 1_128, 1_692), classes=47,
    ),
    DatasetSource(
        "eurosat",
        (Download("EuroSAT.zip", url="https://huggingface.co/datasets/torchgeo/eurosat/resolve/"
                                     "c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip",
                  md5="c8fa014336c82ac7804f0398fcb19387", save_to="eurosat", extract=True),
         _split("EuroSAT", "eurosat", "1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o")),
        expected=(13_500, 5_400, 8_100), classes=10,
    ),
    DatasetSource(
        "ucf101",
        (Download("UCF-101-midframes.zip", drive_id="10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O", save_to="ucf101",
                  extract=True),
         _split("UCF101", "ucf101", "1I0S0q91hJfsV9Gf4xDIjgDq4AqBNJb1y")),
        expected=(7_639, 1_898, 3_783), classes=101,
    ),
    DatasetSource(
        "imagenet_v2",
        (Download("imagenetv2-matched-frequency.tar.gz",
                  url="https://huggingface.co/datasets/vaishaal/ImageNetV2/resolve/main/imagenetv2-matched-frequency.tar.gz",
                  sha256="f0c37fdf925916b19ea1323cd9a2208cdb6959ba2c32eef2a7fc393835c9ca7c",  # 1,264,079,360 B
                  save_to="imagenetv2", extract=True),
         _imagenet_classnames("imagenetv2")),
        expected=(0, 0, 10_000), classes=1000,
    ),
    DatasetSource(
        "imagenet_sketch",  # zip top folder sketch/ -> CoOp's images/
        (Download("ImageNet-Sketch.zip", drive_id="1Mj0i5HBthqH1p_yeXzsg22gZduvgoNeA",
                  sha256="4d3ce6b82a7c48aabf14aeac105eb533e75707f152cc858f55bfc022031a72ed",  # 7,593,573,012 B
                  save_to="imagenet-sketch", extract=True),
         _imagenet_classnames("imagenet-sketch")),
        expected=(0, 0, 50_889), classes=1000,
        moves=(("imagenet-sketch/sketch", "imagenet-sketch/images"),),
    ),
    DatasetSource(
        "imagenet_a",
        (Download("imagenet-a.tar", url=f"{HENDRYCKS}/imagenet-a.tar", md5="c3e55429088dc681f30d81f4726b6595",
                  sha256="3bb3632277e6ba6392ea64c02ddbf4dd2266c9caffd6bc09c9656d28f012589e",  # 687,552,512 B
                  save_to="imagenet-adversarial", extract=True),
         _imagenet_classnames("imagenet-adversarial")),
        expected=(0, 0, 7_500), classes=200,
    ),
    DatasetSource(
        "imagenet_r",
        (Download("imagenet-r.tar", url=f"{HENDRYCKS}/imagenet-r.tar", md5="a61312130a589d0ca1a8fca1f2bd3337",
                  sha256="18c6bf493b39a0d975d48e587437f562caab9c52ae6327dcfa9dd8eb54aa1b52",  # 2,191,079,936 B
                  save_to="imagenet-rendition", extract=True),
         _imagenet_classnames("imagenet-rendition")),
        expected=(0, 0, 30_000), classes=200,
    ),
    _mos("ood_inaturalist", "iNaturalist"),
    _mos("ood_sun", "SUN"),
    _mos("ood_places", "Places"),
    DatasetSource("ood_textures", (DTD_ARCHIVE,), expected=(0, 0, 5_640), classes=47),
)}
