//! Per-queue request execution (being written).
