'use strict';

// The message goes on as it came: the returned object is emitted as `data`, then `end`.
exports.process = async function process(msg) {
    return { body: msg.body };
};
