'use strict';

// What elasticio-node's messages.newMessageWithBody makes, without the dependency. The id
// matters: the sailor sends it as the messageId header, and the next sailor's deduplication
// (2.7.7+) takes two deliveries with one messageId for one message.
const { randomUUID } = require('crypto');

exports.newMessageWithBody = (body) => ({
    id: randomUUID(),
    attachments: {},
    body,
    headers: {},
    metadata: {}
});
