"""Exception hierarchy: one base class, one subclass per pipeline stage."""

from __future__ import annotations


class NodeError(Exception):
    """Base class of every error raised on purpose by cxr-node."""


class ConfigError(NodeError):
    """The configuration file, environment or command line is invalid."""


class SpoolError(NodeError):
    """A received object could not be stored durably."""


class MalformedDataset(NodeError):
    """A received data set breaks DICOM's encoding rules in a way that makes it ambiguous,
    e.g. an element repeated or out of tag order."""


class PreprocessError(NodeError):
    """An image could not be turned into a model input."""


class ModelError(NodeError):
    """The model or its weights could not be loaded or run."""


class ReportError(NodeError):
    """The structured report could not be built."""


class SendError(NodeError):
    """A DICOM association or C-STORE to a remote peer failed."""


class Unreachable(SendError):
    """No association could be had with the peer, or it ended before answering: refused,
    timed out, aborted or rejected. Nothing was refused by status: it is not the data's fault."""


class AssociationRejected(Unreachable):
    """The peer answered the association request with an A-ASSOCIATE-RJ (an unknown AE
    title, say): asking again the same way gets the same answer."""


class ContextsRefused(SendError):
    """The peer accepted the association request but none of its presentation contexts:
    it does not take those SOP classes (or their transfer syntaxes); others may go."""


class OutputError(NodeError):
    """A result file (CSV, JSON, SR copy) could not be written."""


class ArchiveError(NodeError):
    """An input path (file, folder or zip archive) could not be read."""


def unexpected(stage: type[NodeError], where: str, exc: BaseException) -> NodeError:
    """The per-job boundary's error for an exception nobody raised on purpose: the stage's
    class, naming the stage, the exception's type and its message."""
    return stage(f"{where}: {type(exc).__name__}: {exc}")
