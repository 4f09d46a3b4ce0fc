'use strict';

// One line a message: "seq emitted_ms handled_ms" (CLOCK_MONOTONIC), written at once so that
// nothing is lost if the process is stopped.
const fs = require('fs');
const { now } = require('../clock.js');

let fd = null;

exports.process = async function process(msg, cfg) {
    const t = now();
    if (fd === null) {
        fd = fs.openSync(cfg.out, 'a');
    }
    fs.writeSync(fd, `${msg.body.seq} ${msg.body.t} ${t}\n`);
};
