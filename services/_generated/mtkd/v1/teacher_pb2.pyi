from services._generated.mtkd.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OutputField(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_FIELD_UNSPECIFIED: _ClassVar[OutputField]
    OUTPUT_FIELD_LOGITS: _ClassVar[OutputField]
    OUTPUT_FIELD_EMBEDDING: _ClassVar[OutputField]
    OUTPUT_FIELD_FEATURE: _ClassVar[OutputField]
OUTPUT_FIELD_UNSPECIFIED: OutputField
OUTPUT_FIELD_LOGITS: OutputField
OUTPUT_FIELD_EMBEDDING: OutputField
OUTPUT_FIELD_FEATURE: OutputField

class DescribeTeacherRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TeacherInfo(_message.Message):
    __slots__ = ("name", "num_classes", "input_shape", "embedding_dim", "feature_shape", "weights_digest", "max_batch", "model", "preprocessing", "numerics", "logit_size", "output_stride", "logit_channels")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    NUMERICS_FIELD_NUMBER: _ClassVar[int]
    LOGIT_SIZE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_STRIDE_FIELD_NUMBER: _ClassVar[int]
    LOGIT_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_classes: int
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    embedding_dim: int
    feature_shape: _containers.RepeatedScalarFieldContainer[int]
    weights_digest: str
    max_batch: int
    model: str
    preprocessing: Preprocessing
    numerics: str
    logit_size: _containers.RepeatedScalarFieldContainer[int]
    output_stride: int
    logit_channels: int
    def __init__(self, name: _Optional[str] = ..., num_classes: _Optional[int] = ..., input_shape: _Optional[_Iterable[int]] = ..., embedding_dim: _Optional[int] = ..., feature_shape: _Optional[_Iterable[int]] = ..., weights_digest: _Optional[str] = ..., max_batch: _Optional[int] = ..., model: _Optional[str] = ..., preprocessing: _Optional[_Union[Preprocessing, _Mapping]] = ..., numerics: _Optional[str] = ..., logit_size: _Optional[_Iterable[int]] = ..., output_stride: _Optional[int] = ..., logit_channels: _Optional[int] = ...) -> None: ...

class Preprocessing(_message.Message):
    __slots__ = ("mean", "std", "pixel_min", "pixel_max")
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    PIXEL_MIN_FIELD_NUMBER: _ClassVar[int]
    PIXEL_MAX_FIELD_NUMBER: _ClassVar[int]
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    pixel_min: float
    pixel_max: float
    def __init__(self, mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., pixel_min: _Optional[float] = ..., pixel_max: _Optional[float] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("images", "fields", "half_precision", "request_id", "max_chunk_bytes")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    HALF_PRECISION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    images: _tensor_pb2.Tensor
    fields: _containers.RepeatedScalarFieldContainer[OutputField]
    half_precision: bool
    request_id: str
    max_chunk_bytes: int
    def __init__(self, images: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., fields: _Optional[_Iterable[_Union[OutputField, str]]] = ..., half_precision: _Optional[bool] = ..., request_id: _Optional[str] = ..., max_chunk_bytes: _Optional[int] = ...) -> None: ...

class InferResponse(_message.Message):
    __slots__ = ("logits", "embedding", "feature", "batch_offset", "batch_size", "request_id")
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    BATCH_OFFSET_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    logits: _tensor_pb2.Tensor
    embedding: _tensor_pb2.Tensor
    feature: _tensor_pb2.Tensor
    batch_offset: int
    batch_size: int
    request_id: str
    def __init__(self, logits: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., embedding: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., feature: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., batch_offset: _Optional[int] = ..., batch_size: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...
