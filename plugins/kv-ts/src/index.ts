// The component's entry module: componentize-qjs evaluates it at build time
// and exports its `stateMachine` and `codec` as the WIT interfaces
// `raftify:fsm/state-machine` and `raftify:fsm/codec`.
//
// A new plugin changes only the import below (and keeps src/sdk/ as it is).

import { kvPlugin } from "./kv.js";
import { exportPlugin } from "./sdk/plugin.js";

const exports = exportPlugin(kvPlugin);

export const stateMachine = exports.stateMachine;
export const codec = exports.codec;
