"""The role objects behind :class:`embresume.integrations.vllm.EmbresumeECConnector`.

vLLM builds one connector per process with ``(vllm_config, role)``; the
connector picks one of these at construction and hands every call of vLLM's
``ECConnectorBase`` API to it:

==========================  ==========================  =====================================
ec_role / receive           scheduler process           worker process (each TP rank)
==========================  ==========================  =====================================
``ec_producer``             :class:`ProducerScheduler`  :class:`ProducerWorker`
``ec_consumer`` scheduler   :class:`LandingScheduler`   :class:`LandingWorker`
``ec_consumer`` worker      :class:`WorkerRecvScheduler` :class:`WorkerRecvWorker`
``ec_both``                 :class:`Both` of the two above
==========================  ==========================  =====================================

:class:`Role` answers every call the way a connector that has nothing to do
answers it; each role overrides what it takes part in.  The landing
scheduler's per-item state is the pure :class:`~._items.ItemTracker`; this
module does its I/O (endpoint calls, region copies, counters, logs).

The roles live in :mod:`._vllm_base` (shared: options, metadata, counters),
:mod:`._vllm_consumer` (landing), :mod:`._vllm_worker_recv` and
:mod:`._vllm_producer`; this module names them all in one place.
"""

from ._vllm_base import (  # noqa: F401
    BUSY_CODES, MAX_WIDTH, MAX_WIDTHS, PARAM_KEY, Both, Counters, EmbresumeECMetadata, EmbresumeECWorkerMetadata,
    LoadSpec, Options, Role, discard, dp_address, dtype_name, group, metadata_resolver, model_encoder_width,
    param_entry, positive, size, uncomputed, worker_device,
)
from ..errors import ConfigError  # noqa: F401
from ._vllm_consumer import CacheMirror, FailureAlarm, LandingScheduler, LandingWorker  # noqa: F401
from ._vllm_producer import ProducerScheduler, ProducerWorker, Publisher  # noqa: F401
from ._vllm_worker_recv import WorkerRecvScheduler, WorkerRecvWorker  # noqa: F401
