'use strict';
// deployd's stand-in for the `elasticio-node` package, resolved only when a component does
// not install that package itself (see deployd/runtime/sailor.js).
exports.messages = require('./lib/messages.js');
