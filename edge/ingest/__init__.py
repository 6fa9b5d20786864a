"""Frames in: the Storage SCP, the watched folder and replay; the durable spool and ledger;
series assembly and the streaming pipeline; the service that wires them (``edge serve``)."""
