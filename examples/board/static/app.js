// The board app's front end, without a build step. Its channel calls are the seed's own
// (web/static/js/actions/sessions.js and current_board.js): the same socket, topics,
// events and payloads, so it runs against phxbroker and the hooks back end unchanged.
import {Socket} from "/js/phoenix.mjs"

// The seed opens its socket on the page's own origin. When phxbroker is not behind the
// same origin as this page, ?socket=ws://127.0.0.1:4000/socket points elsewhere.
const SOCKET_PATH = new URLSearchParams(location.search).get("socket") || "/socket"

const $ = (id) => document.getElementById(id)
const state = {socket: null, userChannel: null, boardChannel: null, board: null}

async function http(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: {
      Accept: "application/json",
      "Content-Type": "application/json",
      Authorization: localStorage.getItem("phoenixAuthToken") || "",
    },
    body: body === undefined ? undefined : JSON.stringify(body),
  })
  const data = await response.json()
  if (!response.ok) throw new Error(data.error || response.statusText)
  return data
}

// -- sessions.js ----------------------------------------------------------------------

function setCurrentUser(user) {
  const socket = new Socket(SOCKET_PATH, {
    params: {token: localStorage.getItem("phoenixAuthToken")},
    logger: (kind, msg, data) => { console.log(`${kind}: ${msg}`, data) },
  })
  socket.connect()

  const channel = socket.channel(`users:${user.id}`)
  if (channel.state != "joined") {
    channel.join().receive("ok", () => {
      state.socket = socket
      state.userChannel = channel
      showSignedIn(user)
    })
  }

  channel.on("boards:add", (msg) => { addBoardLink(msg.board) })
}

async function signIn(email, password) {
  try {
    const data = await http("POST", "/api/v1/sessions", {session: {email, password}})
    localStorage.setItem("phoenixAuthToken", data.jwt)
    setCurrentUser(data.user)
  } catch (error) {
    $("sign-in-error").textContent = error.message
  }
}

async function signOut() {
  await http("DELETE", "/api/v1/sessions").catch(() => {})
  localStorage.removeItem("phoenixAuthToken")
  location.reload()
}

// -- current_board.js -----------------------------------------------------------------

function connectToChannel(socket, boardId) {
  const channel = socket.channel(`boards:${boardId}`)

  channel.join()
    .receive("ok", (response) => { setBoard(response.board) })
    .receive("error", (response) => { $("board-error").textContent = response.reason || "" })

  channel.on("user:joined", (msg) => { renderConnected(msg.users) })
  channel.on("user:left", (msg) => { renderConnected(msg.users) })
  channel.on("list:created", (msg) => {
    state.board.lists.push(msg.list)
    renderBoard()
  })
  channel.on("card:created", (msg) => {
    const list = state.board.lists.find((each) => each.id === msg.card.list_id)
    if (list) list.cards.push(msg.card)
    renderBoard()
  })
  channel.on("member:added", (msg) => {
    state.board.members.push(msg.user)
    renderBoard()
  })
  channel.on("card:updated", (msg) => { setBoard(msg.board) })
  channel.on("list:updated", (msg) => { setBoard(msg.board) })
  channel.on("comment:created", (msg) => { setBoard(msg.board) })

  state.boardChannel = channel
}

function addNewMember(channel, email) {
  channel.push("members:add", {email: email})
    .receive("error", (data) => { $("member-error").textContent = data.error })
}

function saveList(channel, data) {
  const topic = data.id ? "list:update" : "lists:create"
  channel.push(topic, {list: data})
}

function createCard(channel, data) {
  channel.push("cards:create", {card: data})
}

// -- rendering (DOM text only: names typed by users are never parsed as HTML) ------------

function element(tag, text, attributes = {}) {
  const node = document.createElement(tag)
  if (text !== undefined) node.textContent = text
  Object.assign(node, attributes)
  return node
}

const fullName = (user) => `${user.first_name} ${user.last_name}`

async function showSignedIn(user) {
  $("who").textContent = fullName(user)
  $("sign-in").hidden = true
  $("sign-out").hidden = false
  $("boards").hidden = false
  const {owned_boards, invited_boards} = await http("GET", "/api/v1/boards")
  for (const board of [...owned_boards, ...invited_boards]) addBoardLink(board)
}

function addBoardLink(board) {
  const button = element("button", board.name, {className: "link"})
  button.addEventListener("click", () => openBoard(board.id))
  const item = element("li")
  item.append(button)
  $("board-list").append(item)
}

function openBoard(boardId) {
  if (state.boardChannel) state.boardChannel.leave()
  $("board-error").textContent = ""
  connectToChannel(state.socket, boardId)
}

function setBoard(board) {
  state.board = board
  renderBoard()
}

function renderConnected(userIds) {
  $("connected").textContent = userIds.map((id) => `#${id}`).join(", ")
}

function renderBoard() {
  const board = state.board
  $("board").hidden = false
  $("board-name").textContent = board.name
  $("members").textContent = board.members.map(fullName).join(", ")
  const lists = $("lists")
  lists.replaceChildren()
  for (const list of board.lists) {
    const column = element("div", undefined, {className: "list"})
    column.append(element("h3", list.name))
    for (const card of list.cards) column.append(element("div", card.name, {className: "card"}))
    const form = element("form")
    const input = element("input", undefined, {name: "name", placeholder: "Add a new card...", required: true})
    form.append(input, element("button", "Add"))
    form.addEventListener("submit", (event) => {
      event.preventDefault()
      createCard(state.boardChannel, {name: input.value, list_id: list.id})
      form.reset()
    })
    column.append(form)
    lists.append(column)
  }
}

// -- wiring ---------------------------------------------------------------------------

$("sign-in").addEventListener("submit", (event) => {
  event.preventDefault()
  const form = new FormData(event.target)
  signIn(form.get("email"), form.get("password"))
})
$("sign-out").addEventListener("click", signOut)
$("add-list").addEventListener("submit", (event) => {
  event.preventDefault()
  saveList(state.boardChannel, {name: new FormData(event.target).get("name")})
  event.target.reset()
})
$("add-member").addEventListener("submit", (event) => {
  event.preventDefault()
  $("member-error").textContent = ""
  addNewMember(state.boardChannel, new FormData(event.target).get("email"))
  event.target.reset()
})

// As the seed's currentUser action: a stored token signs the user in again.
if (localStorage.getItem("phoenixAuthToken")) {
  http("GET", "/api/v1/current_user").then(setCurrentUser).catch(() => {
    localStorage.removeItem("phoenixAuthToken")
  })
}
