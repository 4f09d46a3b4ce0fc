'use strict';

// CLOCK_MONOTONIC in milliseconds (fractional). It is one clock for every process on the
// machine, so a stamp taken in the trigger's process can be compared in the sink's.
exports.now = () => Number(process.hrtime.bigint()) / 1e6;
