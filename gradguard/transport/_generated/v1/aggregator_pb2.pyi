from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "averaged")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    AVERAGED_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    averaged: bool
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., averaged: bool = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("round", "tensors", "max_update_bytes", "min_clients", "round_deadline_s")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    MAX_UPDATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MIN_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    ROUND_DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    round: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    max_update_bytes: int
    min_clients: int
    round_deadline_s: float
    def __init__(self, round: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., max_update_bytes: _Optional[int] = ..., min_clients: _Optional[int] = ..., round_deadline_s: _Optional[float] = ...) -> None: ...

class FetchGlobalRequest(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class GlobalModelHeader(_message.Message):
    __slots__ = ("round", "total_bytes", "digest")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    round: int
    total_bytes: int
    digest: str
    def __init__(self, round: _Optional[int] = ..., total_bytes: _Optional[int] = ..., digest: _Optional[str] = ...) -> None: ...

class GlobalModelChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: GlobalModelHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[GlobalModelHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("round", "client_id", "kind", "num_samples", "num_steps", "batch_size", "learning_rate", "epsilon", "delta", "metadata", "total_bytes", "digest", "leakage")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    LEAKAGE_FIELD_NUMBER: _ClassVar[int]
    round: int
    client_id: str
    kind: str
    num_samples: int
    num_steps: int
    batch_size: int
    learning_rate: float
    epsilon: float
    delta: float
    metadata: _containers.ScalarMap[str, str]
    total_bytes: int
    digest: str
    leakage: LeakageReport
    def __init__(self, round: _Optional[int] = ..., client_id: _Optional[str] = ..., kind: _Optional[str] = ..., num_samples: _Optional[int] = ..., num_steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., metadata: _Optional[_Mapping[str, str]] = ..., total_bytes: _Optional[int] = ..., digest: _Optional[str] = ..., leakage: _Optional[_Union[LeakageReport, _Mapping]] = ...) -> None: ...

class LeakageReport(_message.Message):
    __slots__ = ("threat", "estimators", "target_db", "psnr_above_prior_max", "psnr_above_prior_mean", "ssim_above_prior_max", "ssim_above_prior_mean", "amplitude_max", "amplitude_mean", "samples", "noised_samples", "met")
    THREAT_FIELD_NUMBER: _ClassVar[int]
    ESTIMATORS_FIELD_NUMBER: _ClassVar[int]
    TARGET_DB_FIELD_NUMBER: _ClassVar[int]
    PSNR_ABOVE_PRIOR_MAX_FIELD_NUMBER: _ClassVar[int]
    PSNR_ABOVE_PRIOR_MEAN_FIELD_NUMBER: _ClassVar[int]
    SSIM_ABOVE_PRIOR_MAX_FIELD_NUMBER: _ClassVar[int]
    SSIM_ABOVE_PRIOR_MEAN_FIELD_NUMBER: _ClassVar[int]
    AMPLITUDE_MAX_FIELD_NUMBER: _ClassVar[int]
    AMPLITUDE_MEAN_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NOISED_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MET_FIELD_NUMBER: _ClassVar[int]
    threat: str
    estimators: _containers.RepeatedScalarFieldContainer[str]
    target_db: float
    psnr_above_prior_max: float
    psnr_above_prior_mean: float
    ssim_above_prior_max: float
    ssim_above_prior_mean: float
    amplitude_max: float
    amplitude_mean: float
    samples: int
    noised_samples: int
    met: bool
    def __init__(self, threat: _Optional[str] = ..., estimators: _Optional[_Iterable[str]] = ..., target_db: _Optional[float] = ..., psnr_above_prior_max: _Optional[float] = ..., psnr_above_prior_mean: _Optional[float] = ..., ssim_above_prior_max: _Optional[float] = ..., ssim_above_prior_mean: _Optional[float] = ..., amplitude_max: _Optional[float] = ..., amplitude_mean: _Optional[float] = ..., samples: _Optional[int] = ..., noised_samples: _Optional[int] = ..., met: bool = ...) -> None: ...

class UpdateTrailer(_message.Message):
    __slots__ = ("digest",)
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    digest: str
    def __init__(self, digest: _Optional[str] = ...) -> None: ...

class SubmitUpdateRequest(_message.Message):
    __slots__ = ("header", "data", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    data: bytes
    trailer: UpdateTrailer
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., trailer: _Optional[_Union[UpdateTrailer, _Mapping]] = ...) -> None: ...

class SubmitUpdateResponse(_message.Message):
    __slots__ = ("round", "digest", "duplicate", "accepted_in_round")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_IN_ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    digest: str
    duplicate: bool
    accepted_in_round: int
    def __init__(self, round: _Optional[int] = ..., digest: _Optional[str] = ..., duplicate: bool = ..., accepted_in_round: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("round", "accepted_in_round", "joined_clients", "min_clients", "seconds_to_deadline", "joined", "submitted")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_IN_ROUND_FIELD_NUMBER: _ClassVar[int]
    JOINED_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    MIN_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_TO_DEADLINE_FIELD_NUMBER: _ClassVar[int]
    JOINED_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_FIELD_NUMBER: _ClassVar[int]
    round: int
    accepted_in_round: int
    joined_clients: int
    min_clients: int
    seconds_to_deadline: float
    joined: bool
    submitted: bool
    def __init__(self, round: _Optional[int] = ..., accepted_in_round: _Optional[int] = ..., joined_clients: _Optional[int] = ..., min_clients: _Optional[int] = ..., seconds_to_deadline: _Optional[float] = ..., joined: bool = ..., submitted: bool = ...) -> None: ...
