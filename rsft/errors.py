"""Errors a user can meet and fix; stages print them without a traceback."""


class RsftError(Exception):
    """An error caused by input the user controls: params, data or files."""


class ParamsError(RsftError):
    """params.yaml has an unknown, missing or invalid key."""


class DataError(RsftError):
    """The dataset is missing, truncated or fails its checksum."""


class CheckpointError(RsftError):
    """A checkpoint file is missing, foreign or does not match the model."""


class TrainingDivergedError(RsftError):
    """A loss became NaN or infinite during training."""


class TrackingError(RsftError):
    """The MLflow tracking store cannot be reached or written."""
