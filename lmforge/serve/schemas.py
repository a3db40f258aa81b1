"""Request and response bodies (pydantic): they are the OpenAPI document at /openapi.json, and a
request that does not fit them is refused with 422 naming the field before it reaches the model."""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

MAX_INPUTS = 256          # inputs per request
MAX_CHARS = 100_000       # characters per text (tokens are limited by --max-input-tokens)


def _utf8(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate from a JSON \ud800 escape
        raise ValueError(f"not valid Unicode text (character {e.start})") from None
    return s


Text = Annotated[str, Field(max_length=MAX_CHARS), AfterValidator(_utf8)]
Pair = Annotated[list[Text], Field(min_length=2, max_length=2, description="[text, text_pair]")]
AdapterName = Annotated[Optional[str], Field(max_length=64, description="a loaded adapter; null: the base model")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClassifyRequest(Strict):
    adapter: AdapterName = None
    inputs: Annotated[list[Union[Text, Pair]], Field(min_length=1, max_length=MAX_INPUTS)]
    truncate: bool = Field(False, description="cut inputs longer than the token limit instead of answering 413")

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"adapter": "sst2", "inputs": ["a gorgeous film", ["A man sleeps.", "A person rests."]]}]})


class ClassifyResult(BaseModel):
    label: Optional[str] = None
    probabilities: Optional[dict[str, float]] = None
    score: Optional[float] = Field(None, description="regression heads: the predicted value")


class ClassifyResponse(BaseModel):
    model: str
    adapter: Optional[str]
    results: list[ClassifyResult]


class EmbedRequest(Strict):
    adapter: AdapterName = None
    inputs: Annotated[list[Text], Field(min_length=1, max_length=MAX_INPUTS)]
    truncate: bool = False


class EmbedResponse(BaseModel):
    model: str
    adapter: Optional[str]
    dim: int
    embeddings: list[list[float]]


class GenerateRequest(Strict):
    prompt: Annotated[str, Field(min_length=1, max_length=MAX_CHARS), AfterValidator(_utf8)]
    max_new_tokens: int = Field(20, ge=1, le=512)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0.0, le=100.0)
    top_k: int = Field(0, ge=0, le=1_000_000)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1)
    num_beams: int = Field(1, ge=1, le=16, description="beam search when > 1 (not with do_sample)")
    length_penalty: float = Field(1.0, ge=-10.0, le=10.0, description="beam search: log p / length ** this")
    no_repeat_ngram_size: int = Field(0, ge=0, le=16, description="never repeat an n-gram of this size (0: off)")
    no_repeat_ngram_scope: Literal["all", "output"] = Field(
        "all", description="the n-grams no_repeat_ngram_size blocks: the prompt's and the output's (all, as "
                           "transformers does) or the output's alone (output, as the LoRA paper's decoding does)")
    stop: Annotated[list[Annotated[str, Field(min_length=1, max_length=200)]], Field(max_length=8)] = Field(
        default_factory=list, description="the text ends before the first of these strings")
    stream: bool = Field(False, description='answer with server-sent events (text/event-stream): `data: {"text"}` '
                         'per chunk of text as it is decoded, then `data: {..., "finish_reason"}`, then `data: [DONE]`')

    @model_validator(mode="after")
    def _beams_do_not_sample(self):
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("num_beams > 1 is beam search, which does not sample: set do_sample false")
        return self


class GenerateResponse(BaseModel):
    model: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["eos", "stop", "length"]


class AdapterInfo(BaseModel):
    name: str
    source: Optional[str] = None
    labels: list[str]
    regression: bool
    classifier: bool


class AdaptersResponse(BaseModel):
    base: AdapterInfo
    adapters: list[AdapterInfo]


class LoadAdapterRequest(Strict):
    name: Annotated[str, Field(min_length=1, max_length=200)]
    path: Annotated[str, Field(min_length=1, max_length=4096,
                               description="a directory below --adapter-root (a LoRA run or its best/)")]


class Health(BaseModel):
    status: Literal["ok", "draining"]
    model: str
    model_type: str
    adapters: int
    queue_depth: int
    quantized: Optional[str] = None
    device: str
    precision: Literal["fp32", "bf16"] = Field(description="what forward passes compute in (bf16: autocast, "
                                                            "fp32 weights)")
    precision_why: str


class ErrorDetail(BaseModel):
    status: int
    message: str
    field: Optional[str] = None
    loaded: Optional[list[str]] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
