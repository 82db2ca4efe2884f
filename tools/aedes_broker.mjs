// A plain aedes broker for tools/broker_matrix.py: default (in-memory) persistence, anonymous,
// one TCP listener on 127.0.0.1. Usage: node aedes_broker.mjs PORT
// Run from the folder where `npm install aedes` put node_modules (the matrix copies it there).
import { createServer } from 'node:net'
import { Aedes } from 'aedes'

const port = Number(process.argv[2] || 1883)
const broker = await Aedes.createBroker()
const server = createServer(broker.handle)

function stop () {
  server.close(() => broker.close(() => process.exit(0)))
}
process.on('SIGTERM', stop)
process.on('SIGINT', stop)

server.listen(port, '127.0.0.1', () => {
  console.log(`aedes listening on 127.0.0.1:${port}`)
})
