'use strict';
// Messages are {id, body, headers, attachments, metadata}, as the platform's helper builds them.
const crypto = require('crypto');

function newEmptyMessage() {
  return { id: crypto.randomUUID(), attachments: {}, body: {}, headers: {}, metadata: {} };
}

function newMessageWithBody(body) {
  const msg = newEmptyMessage();
  msg.body = body;
  return msg;
}

module.exports = { newEmptyMessage, newMessageWithBody };
