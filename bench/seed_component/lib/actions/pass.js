'use strict';

// The message goes on as it came, as a new message: what process() returns is emitted as
// `data`, then `end` (and the sailor acks the input).
const { newMessageWithBody } = require('../messages.js');

exports.process = async function process(msg) {
    return newMessageWithBody(msg.body);
};
