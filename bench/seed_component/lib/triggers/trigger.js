'use strict';

// One call of process() is one poll: the platform (here the bench) sends the trigger step one
// message and the trigger emits its messages from that call, as a polling trigger does.
// cfg comes from the step info the API stub answers: seconds to run, rate (msg/s, 0 = as fast
// as emit allows) and the file the trigger's tally goes to.
const fs = require('fs');
const { now } = require('../clock.js');
const { newMessageWithBody } = require('../messages.js');

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

exports.process = async function process(msg, cfg) {
    const rate = Number(cfg.rate) || 0;
    const start = now();
    const end = start + Number(cfg.seconds) * 1000;
    let seq = 0;
    // the run ends at `end` even when the emits fell behind the rate: the tally tells
    for (;;) {
        let t = now();
        if (rate) {
            const due = start + (seq * 1000) / rate;
            if (due >= end) {
                break;
            }
            if (due > t) {
                await sleep(due - t);
                t = now();
            }
        }
        if (t >= end) {
            break;
        }
        // the documented way to emit: wait for it (the sailor's flow control and confirm)
        await this.emit('data', newMessageWithBody({ seq, t }));
        seq += 1;
    }
    const tally = JSON.stringify({ emitted: seq, start, end: now(), rate });
    fs.writeFileSync(cfg.tally + '.tmp', tally);
    fs.renameSync(cfg.tally + '.tmp', cfg.tally);
};
