from services._generated.mtkd.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DescribeAgentRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AgentInfo(_message.Message):
    __slots__ = ("num_teachers", "state_dim", "policy_version", "rule", "mixing", "max_batch", "max_abs_state", "max_abs_reward")
    NUM_TEACHERS_FIELD_NUMBER: _ClassVar[int]
    STATE_DIM_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    MIXING_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_STATE_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_REWARD_FIELD_NUMBER: _ClassVar[int]
    num_teachers: int
    state_dim: int
    policy_version: int
    rule: str
    mixing: str
    max_batch: int
    max_abs_state: float
    max_abs_reward: float
    def __init__(self, num_teachers: _Optional[int] = ..., state_dim: _Optional[int] = ..., policy_version: _Optional[int] = ..., rule: _Optional[str] = ..., mixing: _Optional[str] = ..., max_batch: _Optional[int] = ..., max_abs_state: _Optional[float] = ..., max_abs_reward: _Optional[float] = ...) -> None: ...

class ActRequest(_message.Message):
    __slots__ = ("states",)
    STATES_FIELD_NUMBER: _ClassVar[int]
    states: _tensor_pb2.Tensor
    def __init__(self, states: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class ActResponse(_message.Message):
    __slots__ = ("weight_logit", "weight_feature", "policy_version")
    WEIGHT_LOGIT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FEATURE_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    weight_logit: _tensor_pb2.Tensor
    weight_feature: _tensor_pb2.Tensor
    policy_version: int
    def __init__(self, weight_logit: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., weight_feature: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., policy_version: _Optional[int] = ...) -> None: ...

class ObserveRequest(_message.Message):
    __slots__ = ("states", "reward", "weight_logit", "weight_feature")
    STATES_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_LOGIT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FEATURE_FIELD_NUMBER: _ClassVar[int]
    states: _tensor_pb2.Tensor
    reward: _tensor_pb2.Tensor
    weight_logit: _tensor_pb2.Tensor
    weight_feature: _tensor_pb2.Tensor
    def __init__(self, states: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., reward: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., weight_logit: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., weight_feature: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class ObserveResponse(_message.Message):
    __slots__ = ("policy_version", "updated")
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    policy_version: int
    updated: bool
    def __init__(self, policy_version: _Optional[int] = ..., updated: _Optional[bool] = ...) -> None: ...

class EndEpochRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Policy(_message.Message):
    __slots__ = ("version", "safetensors")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SAFETENSORS_FIELD_NUMBER: _ClassVar[int]
    version: int
    safetensors: bytes
    def __init__(self, version: _Optional[int] = ..., safetensors: _Optional[bytes] = ...) -> None: ...
