'use strict';

// The platform's side of the broker for bench/seed_sailor.py, with the amqplib and the
// Encryptor of the installed sailor (NODE_PATH points at bench/.cache/seed-sailor/node_modules).
//
//   node seed_amqp.js declare|wait-consumers|start|counts|delete SPEC.json
//
// SPEC: {url, exchange, queues: [{name, bindings: [routing key, ...]}], consumers: [queue, ...],
//        start: {queue, password, iv, headers}, timeout_ms}
// Prints one JSON line; exits non-zero on failure.
const fs = require('fs');
const amqplib = require('amqplib');
const Encryptor = require('elasticio-sailor-nodejs/lib/encryptor.js');

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function declare(ch, spec) {
    await ch.assertExchange(spec.exchange, 'direct', { durable: true, autoDelete: false });
    for (const q of spec.queues) {
        await ch.assertQueue(q.name, { durable: true, autoDelete: false });
        await ch.purgeQueue(q.name);
        for (const key of q.bindings) {
            await ch.bindQueue(q.name, spec.exchange, key);
        }
    }
    return { declared: spec.queues.map((q) => q.name) };
}

async function counts(ch, spec) {
    const out = {};
    for (const q of spec.queues) {
        const { messageCount, consumerCount } = await ch.checkQueue(q.name);
        out[q.name] = { messages: messageCount, consumers: consumerCount };
    }
    return out;
}

async function waitConsumers(ch, spec) {
    const deadline = Date.now() + (spec.timeout_ms || 30000);
    for (;;) {
        const waiting = [];
        for (const name of spec.consumers) {
            const { consumerCount } = await ch.checkQueue(name);
            if (consumerCount < 1) {
                waiting.push(name);
            }
        }
        if (!waiting.length) {
            return { consuming: spec.consumers };
        }
        if (Date.now() > deadline) {
            throw new Error(`no consumer on ${waiting.join(', ')}`);
        }
        await sleep(20);
    }
}

// What the platform's scheduler does for a polling flow: one message into the trigger step's
// queue, encoded as every sailor message is (AES-256-CBC, base64 for protocol version 1).
async function start(conn, spec) {
    const ch = await conn.createConfirmChannel();
    const { queue, password, iv, headers } = spec.start;
    const content = new Encryptor(password, iv).encryptMessageContent(
        { headers: {}, body: {} },
        'base64'
    );
    await new Promise((resolve, reject) => {
        ch.publish('', queue, content, { headers, contentType: 'application/json' }, (err) =>
            err ? reject(err) : resolve()
        );
    });
    return { started: queue };
}

async function remove(ch, spec) {
    for (const q of spec.queues) {
        await ch.deleteQueue(q.name);
    }
    await ch.deleteExchange(spec.exchange);
    return { deleted: spec.queues.map((q) => q.name).concat([spec.exchange]) };
}

async function main() {
    const [cmd, specPath] = process.argv.slice(2);
    const spec = JSON.parse(fs.readFileSync(specPath, 'utf8'));
    const conn = await amqplib.connect(spec.url);
    try {
        const ch = await conn.createChannel();
        let out;
        if (cmd === 'declare') {
            out = await declare(ch, spec);
        } else if (cmd === 'wait-consumers') {
            out = await waitConsumers(ch, spec);
        } else if (cmd === 'start') {
            out = await start(conn, spec);
        } else if (cmd === 'counts') {
            out = await counts(ch, spec);
        } else if (cmd === 'delete') {
            out = await remove(ch, spec);
        } else {
            throw new Error(`unknown command ${cmd}`);
        }
        process.stdout.write(JSON.stringify(out) + '\n');
    } finally {
        await conn.close();
    }
}

main().catch((err) => {
    process.stderr.write(`${err.stack || err}\n`);
    process.exit(1);
});
