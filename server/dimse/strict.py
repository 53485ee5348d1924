"""Malformed requests that pynetdicom would leave unanswered end the association instead.

* An A-ASSOCIATE-RQ that pynetdicom decodes but cannot negotiate (a presentation context
  without a transfer syntax) raised in the association thread, which died: the peer got no
  answer and the connection stayed open, with its reader thread, until the peer closed it.
* A DIMSE request that lacks a mandatory command field (an empty Affected SOP Class UID, an
  Affected SOP Instance UID that does not decode) was dropped with a warning and nothing sent
  back, so the peer waited for a response until its own DIMSE timeout, which for a modality
  can be many minutes.

Both now get an A-ABORT (PS3.8 7.3.2: either AE may abort at any time), as DCMTK does with a
command set it cannot parse.  Both were found by tools/fuzz.py.
"""

from __future__ import annotations

import logging
from typing import Any

from pynetdicom.acse import ACSE
from pynetdicom.association import Association

log = logging.getLogger(__name__)

_original_serve_request = Association._serve_request
_original_negotiate = ACSE.negotiate_association


def _negotiate_association(self: ACSE) -> None:
    try:
        _original_negotiate(self)
    except Exception as exc:
        if not self.assoc.is_acceptor:
            raise
        log.warning("A-ASSOCIATE-RQ that cannot be negotiated (%r); aborting", exc)
        self.assoc.abort()


def _serve_request(self: Association, msg: Any, context_id: int) -> None:
    if msg is not None and not self._sent_release and not msg.is_valid_request:
        log.warning(
            "%s from %s lacks a mandatory command field; aborting",
            msg.msg_type,
            self.requestor.ae_title,
        )
        self.abort()
        return
    _original_serve_request(self, msg, context_id)


def install() -> None:
    Association._serve_request = _serve_request  # type: ignore[method-assign]
    ACSE.negotiate_association = _negotiate_association  # type: ignore[method-assign]
